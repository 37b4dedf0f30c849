"""Learned output lengths kept across controller restarts, one small JSON file per LLM.

A controller that starts afresh plans every prompt-length bucket from the prior (fitted to
conversational traffic) until that bucket has seen MIN_SAMPLES finished requests. On traffic
unlike the prior that costs energy for minutes: on the Azure code trace the prior plans 458
tokens for answers whose median is 13, and a bucket takes 4 to 60 minutes to learn (what
starting from the lengths learned before is worth, and what it costs on code, on the
acceptance matrix: docs/evaluation.md, seventh session). So the sidecar writes what it has
learned to `<lengths_dir>/<llm>.lengths.json` every minute and when it stops, and reads it
back when an instance of that LLM attaches.

The file holds each bucket's lengths, oldest first (2,048 a bucket, 16,384 at most), keyed by
the LLM, not the instance: what an answer's length depends on is the model and its clients,
and every instance of one model behind a router serves the same traffic. A file that cannot be
used raises `LengthMemoryError` naming the file and the fault; the sidecar then learns afresh
and the next save replaces the file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .length_predictor import BUCKETS, LengthPredictor

FORMAT = "throttllem-learned-lengths"
VERSION = 1
SUFFIX = ".lengths.json"


class LengthMemoryError(ValueError):
    """A lengths file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LearnedLengths:
    llm: str
    buckets: tuple[tuple[int, ...], ...]  # each prompt-length bucket's lengths, oldest first

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.buckets)


def file_for(directory: Path, llm: str) -> Path:
    """The LLM's file in `directory`; characters unsafe in a file name become '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", llm).strip(".") or "_"
    return directory / f"{safe}{SUFFIX}"


def merge(llm: str, parts: Sequence[Sequence[Sequence[int]]], window: int) -> LearnedLengths:
    """Several predictors' lengths (instances of one LLM) as one: bucket by bucket, each part's
    lengths in turn, the last `window` kept (lengths are exchangeable across instances; the
    bound keeps the file as large as one predictor's memory)."""
    if not parts:
        return LearnedLengths(llm, ())
    count = len(parts[0])
    if any(len(p) != count for p in parts):
        raise ValueError("predictors with different bucket counts cannot be merged")
    merged = []
    for index in range(count):
        joined = [int(t) for p in parts for t in p[index]]
        merged.append(tuple(joined[-window:]) if window > 0 else ())
    return LearnedLengths(llm, tuple(merged))


def learned_from(llm: str, finished: Iterable[tuple[int, int]]) -> LearnedLengths:
    """What a controller learns from serving requests that finished with these (prompt tokens,
    output tokens), in the order they finished: the lengths file it would have written."""
    predictor = LengthPredictor()
    for prompt_tokens, output_tokens in finished:
        predictor.observe(prompt_tokens, output_tokens, predicted_at_arrival=0)
    return LearnedLengths(llm, predictor.learned_lengths())


def save(path: Path, lengths: LearnedLengths) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": FORMAT,
        "version": VERSION,
        "llm": lengths.llm,
        "buckets": [list(b) for b in lengths.buckets],
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, llm: str, buckets: int = BUCKETS) -> LearnedLengths | None:
    """The lengths saved for `llm` (None when no file exists yet), checked to fit a predictor
    of `buckets` buckets."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LengthMemoryError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise LengthMemoryError(f"{path}: not JSON (not UTF-8 text)") from e
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise LengthMemoryError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise LengthMemoryError(f"{path}: not a throttllem lengths file (no format '{FORMAT}')")
    version = body.get("version")
    if version != VERSION:
        raise LengthMemoryError(f"{path}: version {version!r}, this controller reads {VERSION}")
    if body.get("llm") != llm:
        raise LengthMemoryError(f"{path}: holds the lengths of {body.get('llm')!r}, not {llm!r}")
    raw = body.get("buckets")
    if not isinstance(raw, list) or len(raw) != buckets:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise LengthMemoryError(f"{path}: 'buckets' must be a list of {buckets} lists, got {got}")
    out = []
    for index, bucket in enumerate(raw):
        if not isinstance(bucket, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in bucket
        ):
            raise LengthMemoryError(
                f"{path}: bucket {index} must be a list of positive integers (token counts)"
            )
        out.append(tuple(bucket))
    return LearnedLengths(llm, tuple(out))


def seed(
    predictor: LengthPredictor,
    llm: str,
    siblings: Sequence[LengthPredictor],
    directory: Path | None,
) -> str | None:
    """Fill a new instance's `predictor` with what is known of its LLM's lengths: the instances
    of it already running (`siblings`: fresher than any file), else the file in `directory`.
    Returns where they came from (None: nothing known, the predictor stays empty); raises
    LengthMemoryError for a file that cannot be used, the predictor left empty."""
    if siblings:
        known = merge(llm, [p.learned_lengths() for p in siblings], predictor.window)
        source = f"{len(siblings)} running instance(s) of {llm}"
    elif directory is not None:
        path = file_for(directory, llm)
        loaded = load(path, llm, predictor.bucket_count)
        if loaded is None:
            return None
        known, source = loaded, str(path)
    else:
        return None
    taken = predictor.restore(known.buckets)
    return f"{source} ({taken} lengths)"


def merged_for(llm: str, predictors: Sequence[LengthPredictor]) -> LearnedLengths | None:
    """What `predictors` (the instances of one LLM) have learned, merged; None where they have
    learned nothing, so that a file an earlier run left is not emptied."""
    if not predictors:
        return None
    known = merge(llm, [p.learned_lengths() for p in predictors], predictors[0].window)
    return known if known.count else None
