"""What the controller learns from an engine instance, independent of transport and time base.

The telemetry client turns gRPC messages into these; the virtual-time simulator makes them
directly from the twin. Times are seconds in the controller's time base (wall or virtual).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds; None where there is none."""

    ttft_s: float | None = None
    tbt_s: float | None = None
    e2e_s: float | None = None

    def overridden_by(self, other: Slo) -> Slo:
        return Slo(
            other.ttft_s if other.ttft_s is not None else self.ttft_s,
            other.tbt_s if other.tbt_s is not None else self.tbt_s,
            other.e2e_s if other.e2e_s is not None else self.e2e_s,
        )


class Finish(enum.Enum):
    END_ID = "end_id"
    STOP_WORDS = "stop_words"
    LENGTH = "length"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Arrived:
    request_id: int
    time_s: float
    prompt_tokens: int
    max_tokens: int
    slo: Slo = Slo()
    length_hint: int | None = None


@dataclass(frozen=True)
class FirstToken:
    request_id: int
    time_s: float
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    request_id: int
    time_s: float
    output_tokens: int
    reason: Finish


@dataclass(frozen=True)
class Iteration:
    iteration: int
    time_s: float  # end of the iteration
    latency_s: float
    active_requests: int
    queued_requests: int
    context_requests: int
    generation_requests: int
    ctx_tokens: int
    kv_used_blocks: int
    kv_max_blocks: int
    tokens_per_block: int


@dataclass(frozen=True)
class InFlight:
    """One request as a snapshot reports it (to rebuild state after (re)connecting)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    first_token_s: float | None
    slo: Slo = Slo()
    length_hint: int | None = None


Event = Arrived | FirstToken | Finished | Iteration
