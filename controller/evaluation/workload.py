"""Request arrivals for evaluation: read from trace files or synthesised, then windowed, scaled
and clipped. A workload carries lengths, not text: prompts are synthesised to those lengths."""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt


class TraceError(ValueError):
    """A trace file that cannot be read: names the file and the line."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds from the start of the workload
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[TraceRequest, ...]
    clipped_prompts: int = 0  # prompts cut to the model's context

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def rate_per_s(self) -> float:
        return len(self.requests) / self.duration_s if self.duration_s > 0 else 0.0

    def window(self, start_s: float, duration_s: float) -> Workload:
        kept = [r for r in self.requests if start_s <= r.arrival_s < start_s + duration_s]
        shifted = tuple(replace(r, arrival_s=r.arrival_s - start_s) for r in kept)
        return Workload(self.name, shifted, self.clipped_prompts)

    def scaled_to_rate(self, rate_per_s: float) -> Workload:
        """Stretch or compress inter-arrival times so the mean rate is `rate_per_s`."""
        if rate_per_s <= 0:
            raise ValueError(f"rate must be positive, got {rate_per_s}")
        if self.rate_per_s == 0:
            return self
        factor = self.rate_per_s / rate_per_s
        scaled = tuple(replace(r, arrival_s=r.arrival_s * factor) for r in self.requests)
        return Workload(self.name, scaled, self.clipped_prompts)

    def clipped(self, max_context: int, min_output: int = 1, max_output: int = 2048) -> Workload:
        """Outputs cut to `max_output` (what clients ask for at most) and prompts cut so that
        prompt + output fits the model's context; the count of cut prompts is kept."""
        out, clipped = [], 0
        for r in self.requests:
            output = max(min(r.output_tokens, max_context // 2, max_output), min_output)
            prompt = max(r.prompt_tokens, 1)
            if prompt + output > max_context:
                prompt = max_context - output
                clipped += 1
            out.append(TraceRequest(r.arrival_s, prompt, output))
        return Workload(self.name, tuple(out), self.clipped_prompts + clipped)


def _azure_rows(path: Path) -> Iterator[tuple[int, float, int, int]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise TraceError(f"{path}:1: expected header TIMESTAMP,ContextTokens,GeneratedTokens")
        for line, row in enumerate(reader, start=2):
            try:
                stamp, ctx, gen = row
                # 7 fractional digits: Python parses at most 6.
                head, _, frac = stamp.partition(".")
                t = datetime.datetime.fromisoformat(head).timestamp() + float("0." + (frac or "0"))
                yield line, t, int(ctx), int(gen)
            except ValueError as e:
                raise TraceError(f"{path}:{line}: malformed row {row!r} ({e})") from e


def read_trace(path: str | Path) -> Workload:
    """Azure LLM inference CSV, JSON lines (`timestamp` ms, `input_length`, `output_length`), or
    plain CSV (`arrival_s,prompt_tokens,output_tokens`), chosen by the file's first line."""
    path = Path(path)
    try:
        with path.open() as f:
            first = f.readline().strip()
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from e
    rows: list[tuple[float, int, int]] = []
    lines: list[int] = []  # each row's line in the file, for errors found after parsing
    if first.startswith("TIMESTAMP"):
        for n, t, c, g in _azure_rows(path):
            rows.append((t, c, g))
            lines.append(n)
    elif first.startswith("{"):
        with path.open() as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                    rows.append(
                        (
                            float(obj["timestamp"]) / 1000.0,
                            int(obj["input_length"]),
                            int(obj["output_length"]),
                        )
                    )
                    lines.append(line)
                except (ValueError, KeyError, TypeError) as e:
                    raise TraceError(f"{path}:{line}: malformed JSON line ({e!r})") from e
    elif first == "arrival_s,prompt_tokens,output_tokens":
        with path.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if line == 1:
                    continue
                try:
                    a, p, o = row
                    rows.append((float(a), int(p), int(o)))
                    lines.append(line)
                except ValueError as e:
                    raise TraceError(f"{path}:{line}: malformed row {row!r} ({e})") from e
    else:
        raise TraceError(
            f"{path}:1: unknown trace format; expected the Azure CSV header, a JSON object per "
            "line, or 'arrival_s,prompt_tokens,output_tokens'"
        )
    if not rows:
        raise TraceError(f"{path}: no requests")
    for line, (when, prompt, output) in zip(lines, rows, strict=True):
        if prompt < 0 or output < 0 or not math.isfinite(when):
            raise TraceError(f"{path}:{line}: negative length or bad time")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    requests = tuple(
        TraceRequest(when - t0, prompt, max(output, 1)) for when, prompt, output in rows
    )
    return Workload(path.stem, requests)


# Log-normal fits of the Azure LLM inference traces (2023), from their published summaries
# (prompt and output token mean/median; ../shared/data/README.md): sigma = sqrt(2 ln(mean/median)).
@dataclass(frozen=True)
class SyntheticSpec:
    prompt_median_mean: tuple[float, float]
    output_median_mean: tuple[float, float]
    bursty: bool  # gamma arrivals (CV ~13) instead of Poisson


SYNTHETIC = {
    "conv": SyntheticSpec((1020.0, 1155.0), (129.0, 211.0), bursty=False),
    "code": SyntheticSpec((1469.0, 2048.0), (13.0, 27.9), bursty=True),
}
# Inter-arrival coefficient of variation of the bursty code trace is ~13; a gamma process with
# shape 1/CV^2 reproduces that burstiness.
CODE_GAMMA_SHAPE = 1.0 / 13.0**2


def _lognormal(
    rng: np.random.Generator, median: float, mean: float, n: int
) -> npt.NDArray[np.float64]:
    sigma = math.sqrt(2.0 * math.log(mean / median))
    return rng.lognormal(math.log(median), sigma, n)


def synthetic(
    kind: str, rate_per_s: float, duration_s: float, seed: int = 0, *, steady: bool = False
) -> Workload:
    """`synthetic:conv` (Poisson) or `synthetic:code` (bursty gamma) arrivals and lengths;
    `steady` makes the arrivals Poisson whatever the kind (lengths unchanged)."""
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown synthetic workload '{kind}'; valid: {', '.join(SYNTHETIC)}")
    spec = SYNTHETIC[kind]
    rng = np.random.default_rng(seed)
    n = max(int(rate_per_s * duration_s * 1.2) + 16, 16)

    def draw() -> npt.NDArray[np.float64]:
        if spec.bursty and not steady:
            return rng.gamma(CODE_GAMMA_SHAPE, 1.0 / (rate_per_s * CODE_GAMMA_SHAPE), n)
        return rng.exponential(1.0 / rate_per_s, n)

    times = np.cumsum(draw())
    # Bursty gaps vary so much that the first draw can end early: draw on until past the end
    # (only then, so a workload the first draw covered stays what it was).
    while times[-1] < duration_s:
        times = np.concatenate([times, times[-1] + np.cumsum(draw())])
    times = times[times < duration_s]
    k = len(times)
    prompts = _lognormal(rng, *spec.prompt_median_mean, k)
    outputs = _lognormal(rng, *spec.output_median_mean, k)
    requests = tuple(
        TraceRequest(float(t), max(int(p), 1), max(int(o), 1))
        for t, p, o in zip(times, prompts, outputs, strict=True)
    )
    return Workload(f"synthetic:{kind}", requests)


def daily_swing(
    workload: Workload, low_rps: float, high_rps: float, duration_s: float, skip: int = 0
) -> Workload:
    """The workload's requests, in order, re-timed so that the arrival rate follows one compressed
    day: `low_rps` at the start and end, `high_rps` at the middle (a raised cosine). Each request
    keeps its place in the trace's own arrival process (its cumulative count), so the trace's
    burstiness survives the warp. `skip` requests of the trace are passed over first (another
    day from the same trace). Errors when the trace has too few requests for the swing."""
    if not (0 < low_rps <= high_rps):
        raise ValueError(f"swing rates must satisfy 0 < low <= high, got {low_rps}, {high_rps}")
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    grid = np.linspace(0.0, duration_s, 4097)
    amp = (high_rps - low_rps) / 2.0
    # Expected arrivals by time t under the target rate.
    expected = low_rps * grid + amp * (
        grid - duration_s / (2 * math.pi) * np.sin(2 * math.pi * grid / duration_s)
    )
    needed = int(expected[-1])
    reqs = workload.requests[skip:]
    if len(reqs) < needed or workload.rate_per_s <= 0:
        raise ValueError(
            f"{workload.name}: {len(reqs)} requests, the swing needs {needed} "
            f"({low_rps:.2f}..{high_rps:.2f}/s over {duration_s:.0f} s)"
        )
    # Positions in the trace's own arrival process, scaled so the last one taken lands at the
    # end of the day (the trace's rate varies: its overall mean would misplace them).
    chosen = np.array([r.arrival_s for r in reqs[:needed]])
    span = chosen[-1] - chosen[0]
    if span <= 0:
        raise ValueError(f"{workload.name}: the first {needed} requests all arrive at once")
    counts = (chosen - chosen[0]) * (expected[-1] / span)
    times = np.interp(counts, expected, grid)
    timed = tuple(replace(r, arrival_s=float(t)) for r, t in zip(reqs[:needed], times, strict=True))
    return Workload(f"{workload.name} (daily swing)", timed, workload.clipped_prompts)
