"""Leases on GPU clock locks: the clock daemon's bookkeeping, as a pure state machine.

A client that locks clocks holds a lease on those GPUs until `now + lease_s`; every grant or
renewal extends all the GPUs it holds. When the lease lapses (the client hung or died without
its connection closing) or the client goes away, the daemon resets those GPUs. Time is always
given (`now_s`), never read, so tests drive it by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidArgument, LeaseConflict, LeaseLost


@dataclass(frozen=True)
class Lease:
    owner: int
    expires_at_s: float


class LeaseTable:
    """Which client (an opaque `owner` id) holds each GPU, and until when."""

    def __init__(self, max_lease_s: float) -> None:
        if not max_lease_s > 0:
            raise ValueError(f"max_lease_s must be positive, got {max_lease_s}")
        self.max_lease_s = max_lease_s
        self._leases: dict[int, Lease] = {}

    def holder(self, gpu: int, now_s: float) -> int | None:
        """The owner whose lease on `gpu` is still running, if any."""
        lease = self._leases.get(gpu)
        return lease.owner if lease is not None and lease.expires_at_s > now_s else None

    def held_by(self, owner: int, now_s: float) -> tuple[int, ...]:
        return tuple(
            sorted(
                g
                for g, lease in self._leases.items()
                if lease.owner == owner and lease.expires_at_s > now_s
            )
        )

    def check_grant(self, owner: int, gpus: Iterable[int], lease_s: float, now_s: float) -> None:
        """Raise what `grant` would raise, changing nothing (check before touching clocks)."""
        self._check_lease_s(lease_s)
        self._check_free(owner, tuple(gpus), now_s)

    def grant(self, owner: int, gpus: Iterable[int], lease_s: float, now_s: float) -> None:
        """Give `owner` the GPUs (it may already hold some) and extend everything it holds."""
        gpus = tuple(gpus)
        self.check_grant(owner, gpus, lease_s, now_s)
        for gpu in gpus:
            self._leases[gpu] = Lease(owner, now_s + lease_s)
        self._extend(owner, now_s + lease_s, now_s)

    def renew(self, owner: int, lease_s: float, now_s: float) -> tuple[int, ...]:
        """Extend every GPU `owner` holds. A lapsed lease cannot be renewed: its clocks are
        (being) reset, and the client must set them again."""
        self._check_lease_s(lease_s)
        held = self.held_by(owner, now_s)
        if not held:
            raise LeaseLost("no lease to renew: it lapsed (clocks were reset) or was never granted")
        self._extend(owner, now_s + lease_s, now_s)
        return held

    def release(self, owner: int, gpus: Iterable[int], now_s: float) -> None:
        """Drop `owner`'s lease on the GPUs (free GPUs are fine; another's are a conflict)."""
        gpus = tuple(gpus)
        self._check_free(owner, gpus, now_s)
        for gpu in gpus:
            self._leases.pop(gpu, None)

    def release_owner(self, owner: int) -> tuple[int, ...]:
        """Drop every lease of `owner` (it disconnected), lapsed ones included; returns the
        GPUs whose clocks must be reset."""
        gone = sorted(g for g, lease in self._leases.items() if lease.owner == owner)
        for gpu in gone:
            del self._leases[gpu]
        return tuple(gone)

    def expire(self, now_s: float) -> tuple[int, ...]:
        """Remove the leases that have lapsed by `now_s`; returns their GPUs."""
        lapsed = sorted(g for g, lease in self._leases.items() if lease.expires_at_s <= now_s)
        for gpu in lapsed:
            del self._leases[gpu]
        return tuple(lapsed)

    def next_expiry_s(self) -> float | None:
        return min((lease.expires_at_s for lease in self._leases.values()), default=None)

    def _extend(self, owner: int, until_s: float, now_s: float) -> None:
        for gpu, lease in self._leases.items():
            if lease.owner == owner and lease.expires_at_s > now_s:
                self._leases[gpu] = Lease(owner, until_s)

    def _check_free(self, owner: int, gpus: tuple[int, ...], now_s: float) -> None:
        for gpu in gpus:
            other = self.holder(gpu, now_s)
            if other is not None and other != owner:
                raise LeaseConflict(f"GPU {gpu} is leased by another client")

    def _check_lease_s(self, lease_s: float) -> None:
        if not (math.isfinite(lease_s) and 0 < lease_s <= self.max_lease_s):
            raise InvalidArgument(
                f"lease_s must be in (0, {self.max_lease_s}] seconds, got {lease_s}"
            )
