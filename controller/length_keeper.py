"""The sidecar's side of the learned lengths kept across restarts (length_memory.py holds the
file): a new instance's predictor seeded, and saves taken from the control loop but written
off it.

Every minute the control loop hands over each LLM's lengths (a copy: a millisecond for the
16,384 a full predictor holds) and a thread of its own writes them, so that the loop never
waits on the disk (an fsync can take tens of milliseconds); on exit, and when an instance goes,
the write happens at once. A failed write is logged and tried again at the next save.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from . import length_memory
from .length_predictor import LengthPredictor

log = logging.getLogger(__name__)

# llm -> the predictors of its attached instances
Predictors = Callable[[str], list[LengthPredictor]]


class LengthKeeper:
    def __init__(
        self, directory: Path | None, every_s: float, now_s: float, hints: str = "cap"
    ) -> None:
        self.directory = directory  # None: nothing kept, every start learns afresh
        self.hints = hints  # how the predictors use clients' hints (HINT_USES)
        self.every_s = every_s
        self._next_s = now_s + every_s
        self._writer: threading.Thread | None = None

    def new_predictor(
        self, llm: str, instance: str, siblings: list[LengthPredictor]
    ) -> LengthPredictor:
        """A predictor for a new instance of `llm`, seeded with what its running siblings or its
        lengths file know (length_memory.seed); a file that cannot be used is reported and the
        instance learns afresh."""
        predictor = LengthPredictor(hints=self.hints)
        try:
            source = length_memory.seed(predictor, llm, siblings, self.directory)
        except length_memory.LengthMemoryError as e:
            log.error("%s: %s; learning output lengths afresh", instance, e)
        else:
            if source is not None:
                log.info("%s: learned output lengths from %s", instance, source)
        return predictor

    def tick(self, now_s: float, llms: Iterable[str], predictors: Predictors) -> None:
        """The periodic save, when due, written by a thread of its own (none is started while
        the last is still writing)."""
        if now_s < self._next_s:
            return
        self._next_s = now_s + self.every_s
        if self._writer is not None and self._writer.is_alive():
            return
        snapshots = self._snapshots(llms, predictors)
        if snapshots:
            self._writer = threading.Thread(
                target=_write, args=(snapshots,), name="throttllem-lengths", daemon=True
            )
            self._writer.start()

    def save(self, llms: Iterable[str], predictors: Predictors) -> None:
        """Save now, in this thread (after any periodic save still writing)."""
        self.flush()
        _write(self._snapshots(llms, predictors))

    def flush(self) -> None:
        """Wait for a periodic save that is still writing."""
        if self._writer is not None:
            self._writer.join()

    def _snapshots(
        self, llms: Iterable[str], predictors: Predictors
    ) -> list[tuple[Path, length_memory.LearnedLengths]]:
        if self.directory is None:
            return []
        out = []
        for llm in set(llms):
            known = length_memory.merged_for(llm, predictors(llm))
            if known is not None:
                out.append((length_memory.file_for(self.directory, llm), known))
        return out


def _write(snapshots: list[tuple[Path, length_memory.LearnedLengths]]) -> None:
    for path, known in snapshots:
        try:
            length_memory.save(path, known)
        except OSError as e:
            log.warning(
                "cannot save the learned output lengths of %s to %s: %s", known.llm, path, e
            )
