"""Online prediction of how many tokens a request will generate.

Learned from finished requests, conditioned on prompt length (log-spaced buckets), and
conservative: the prediction is the q-quantile of the lengths seen so far AMONG THOSE LONGER THAN
what the request has already generated. So a request that outlives its first prediction gets a
longer one at once; where few lengths in its bucket are that long, the quantile comes from every
bucket's lengths, and one that outlives nearly every length seen is expected to run on as
the longest lengths seen did. Never above max_tokens, never below generated + 1.

A client's hint (`output_length_hint`) is its estimate, and how it is used is the operator's
choice (HINT_USES): `cap`, the default, plans a hinted request at the shorter of its hint and
what the lengths seen say; `trust` at its hint; `ignore` as if it had none. Either way a request
that outlives its hint is predicted as if it had none: planned to end at every next token, it
would be run too slowly for its deadline. Why `cap`: the clock follows the tightest request, so
a hint that errs long raises it for everyone, while one that errs short only runs its own
request slower until it is outlived; with hints off by a log-normal factor of spread 0.5, `trust`
cut the saving on the conversation trace from 43.8% to 36.9%, `cap` raised it to 44.4%
(docs/evaluation.md, eighth session).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

# Until a bucket has seen this many requests, the prior below speaks for it.
MIN_SAMPLES = 32
# A quantile of the lengths longer than what a request has generated is read from its own
# bucket while the bucket holds at least this many of them; beyond, from every bucket's lengths
# pooled (how long a request that has outlived most answers runs on depends little on its
# prompt, and a handful of samples would name the longest seen as the quantile).
MIN_TAIL_SAMPLES = 16
# When the pool holds fewer too, the quantile is g times the same quantile of the longest
# TAIL_FIT_SAMPLES lengths seen divided by the smallest of them: a tail has no scale, but its
# shape shows at its top. On the Azure traces' first 1,500 requests that gives 1.34 g at the
# 90% quantile for conversation (whose lengths end by 1,000) and 3.87 g for code (heavy-tailed;
# past 100-300 generated tokens its 90% quantile is 2.8-3.9 g).
TAIL_FIT_SAMPLES = MIN_SAMPLES
# A log-normal fitted to the Azure LLM inference trace (conversation, 2023): median 129,
# mean 211 output tokens. Used only before the predictor has learned anything.
PRIOR_MEDIAN_TOKENS = 129.0
PRIOR_SIGMA = 0.99
# How a client's length hint is used (module docstring).
HINT_USES = ("cap", "trust", "ignore")
# Log2 prompt-length buckets, 64 tokens up (_bucket); also the layout a lengths file holds.
BUCKETS = 8
# Offsets buckets from one another in LengthPredictor._stacked: above any output length.
_STACK_STRIDE = 1 << 40
# Every bucket's lengths end to end, each bucket's start in them, each bucket's count.
_Stack = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]


@dataclass
class _Bucket:
    window: int
    recent: deque[int] = field(default_factory=deque)
    ordered: list[int] = field(default_factory=list)
    _array: npt.NDArray[np.int64] | None = None

    def add(self, tokens: int) -> None:
        if len(self.recent) == self.window:
            old = self.recent.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, old)]
        self.recent.append(tokens)
        bisect.insort(self.ordered, tokens)
        self._array = None

    def array(self) -> npt.NDArray[np.int64]:
        if self._array is None:
            self._array = np.array(self.ordered, dtype=np.int64)
        return self._array


@dataclass(frozen=True)
class PredictorError:
    """How the predictions made at arrival compared with the true lengths."""

    count: int
    mean_abs_pct_error: float
    under_predicted_share: float  # share of requests that outlived their arrival prediction


class LengthPredictor:
    def __init__(
        self,
        quantile: float = 0.9,
        window: int = 2048,
        buckets: int = BUCKETS,
        hints: str = "cap",
    ) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if hints not in HINT_USES:
            raise ValueError(f"hints must be one of {', '.join(HINT_USES)}, got {hints!r}")
        self.quantile = quantile
        self.hints = hints
        self._buckets = [_Bucket(window) for _ in range(buckets)]
        self._pooled: npt.NDArray[np.int64] | None = None
        self._stack: _Stack | None = None
        self._errors: deque[tuple[int, int]] = deque(maxlen=4096)

    def _bucket(self, prompt_tokens: int) -> _Bucket:
        # Log2 buckets from 64 tokens up: 0-127, 128-255, ..., the last takes the rest.
        index = max(0, int(math.log2(max(prompt_tokens, 1))) - 6)
        return self._buckets[min(index, len(self._buckets) - 1)]

    def learned(self, prompt_tokens: int) -> bool:
        """Whether predictions for this prompt length come from lengths seen, not the prior."""
        return len(self._bucket(prompt_tokens).ordered) >= MIN_SAMPLES

    def predict(
        self,
        prompt_tokens: int,
        max_tokens: int,
        generated: int = 0,
        hint: int | None = None,
        quantile: float | None = None,
    ) -> int:
        """Total output tokens this request is expected to reach (`quantile` overrides the
        predictor's own, as in predict_many)."""
        q = self.quantile if quantile is None else quantile
        floor = min(generated + 1, max_tokens)
        if hint is not None and hint > generated and self.hints != "ignore":
            given = max(floor, min(hint, max_tokens))
            if self.hints == "trust":
                return given
            return min(given, self.predict(prompt_tokens, max_tokens, generated, None, q))
        samples = self._bucket(prompt_tokens).array()
        if samples.shape[0] < MIN_SAMPLES:
            prior = math.ceil(float(self._prior_beyond(q, np.array([generated]))[0]))
            return max(floor, min(prior, max_tokens))
        return int(
            self._tail_quantile(
                samples,
                np.array([generated], dtype=np.int64),
                np.array([max_tokens], dtype=np.int64),
                q,
            )[0]
        )

    def predict_many(
        self,
        prompt_tokens: npt.NDArray[np.int64],
        max_tokens: npt.NDArray[np.int64],
        generated: npt.NDArray[np.int64],
        hint: npt.NDArray[np.int64],
        quantile: float | None = None,
    ) -> npt.NDArray[np.int64]:
        """`predict` for many requests at once (hint <= 0: none); the decision's hot path.
        `quantile` overrides the predictor's own: a low one says how short a request may turn
        out."""
        q = self.quantile if quantile is None else quantile
        if not 0 < q < 1:
            raise ValueError(f"quantile must be in (0, 1), got {q}")
        floor = np.minimum(generated + 1, max_tokens)
        given = np.maximum(floor, np.minimum(hint, max_tokens))
        hinted = (hint > generated) & (self.hints != "ignore")
        out = given.copy()
        # `trust` needs the lengths seen only for requests whose hint no longer speaks; `cap`
        # for every request, to cap the hinted ones.
        free = ~hinted if self.hints == "trust" else np.ones_like(hinted)
        if free.any():
            out[free] = self._from_lengths(
                prompt_tokens[free], max_tokens[free], generated[free], floor[free], q
            )
        if self.hints == "cap":
            out[hinted] = np.minimum(out[hinted], given[hinted])
        return out

    def _from_lengths(
        self,
        prompt_tokens: npt.NDArray[np.int64],
        max_tokens: npt.NDArray[np.int64],
        generated: npt.NDArray[np.int64],
        floor: npt.NDArray[np.int64],
        q: float,
    ) -> npt.NDArray[np.int64]:
        """predict_many's prediction from the lengths seen (or the prior), hints aside."""
        # Every request's quantile from one searchsorted over the buckets stacked end to end
        # (bucket b's lengths offset by b x _STACK_STRIDE): a loop over the buckets took a
        # fifth of a throttllem simulation's time, in numpy calls on a few dozen requests.
        index = np.log2(np.maximum(prompt_tokens, 1)).astype(np.int64) - 6
        index = np.clip(index, 0, len(self._buckets) - 1)
        stacked, starts, counts = self._stacked()
        n = counts[index]
        result = np.empty(prompt_tokens.shape[0], dtype=np.int64)
        learned = n >= MIN_SAMPLES
        if not learned.all():
            prior = np.ceil(self._prior_beyond(q, generated[~learned]))
            result[~learned] = np.maximum(
                floor[~learned], np.minimum(prior.astype(np.int64), max_tokens[~learned])
            )
        if learned.any():
            b, g = index[learned], generated[learned]
            above = self._quantile_above(
                stacked, g, q, start=starts[b], count=n[learned], offset=b * _STACK_STRIDE
            )
            result[learned] = self._from_tail(above, g, max_tokens[learned], q)
        return result

    def _tail_quantile(
        self,
        samples: npt.NDArray[np.int64],
        generated: npt.NDArray[np.int64],
        max_tokens: npt.NDArray[np.int64],
        q: float,
    ) -> npt.NDArray[np.int64]:
        """The q-quantile of the sorted `samples` longer than `generated`, from the pool of
        every bucket where `samples` hold fewer than MIN_TAIL_SAMPLES of them; grown from
        `generated` as the longest lengths seen grow (_growth) where the pool does too.
        Within [generated + 1, max_tokens]."""
        above = self._quantile_above(samples, generated, q)
        return self._from_tail(above, generated, max_tokens, q)

    def _from_tail(
        self,
        out: npt.NDArray[np.int64],
        generated: npt.NDArray[np.int64],
        max_tokens: npt.NDArray[np.int64],
        q: float,
    ) -> npt.NDArray[np.int64]:
        """_tail_quantile from the bucket's own quantiles (`out`: -1 where too few are longer)."""
        # The pool (and the tail's shape read from it) only where needed: rebuilt after every
        # finished request, it would otherwise cost a sort in every decision that follows one.
        thin = out < 0
        if thin.any():
            out[thin] = self._quantile_above(self._pool(), generated[thin], q)
            unknown = out < 0
            if unknown.any():
                # Next to nothing seen that long: the quantile grows with what the request has
                # generated as the longest lengths seen grew (a low one: about the next token).
                grown = np.ceil(generated[unknown] * self._growth(q)).astype(np.int64) + 1
                out[unknown] = grown
        floor = np.minimum(generated + 1, max_tokens)
        return np.maximum(floor, np.minimum(out, max_tokens))

    @staticmethod
    def _quantile_above(
        samples: npt.NDArray[np.int64],
        generated: npt.NDArray[np.int64],
        q: float,
        start: npt.NDArray[np.int64] | int = 0,
        count: npt.NDArray[np.int64] | int | None = None,
        offset: npt.NDArray[np.int64] | int = 0,
    ) -> npt.NDArray[np.int64]:
        """The q-quantile of the sorted lengths samples[start : start + count] longer than
        `generated`; -1 where fewer than MIN_TAIL_SAMPLES are. Per request, `start`, `count`
        and the `offset` every length there carries: one bucket of _stacked each."""
        n = samples.shape[0] if count is None else count
        longer = np.searchsorted(samples, generated + offset, side="right") - start
        pick = np.minimum(longer + (q * (n - longer)).astype(np.int64), np.maximum(n - 1, 0))
        value = samples[start + pick] - offset if samples.shape[0] else np.zeros_like(generated)
        return np.where(n - longer < MIN_TAIL_SAMPLES, -1, value).astype(np.int64)

    def _stacked(self) -> _Stack:
        """Every bucket's sorted lengths end to end, bucket b's offset by b x _STACK_STRIDE
        (so the whole is sorted), with each bucket's start in it and its count."""
        if self._stack is None:
            arrays = [b.array() for b in self._buckets]
            counts = np.array([a.shape[0] for a in arrays], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            stacked = np.concatenate([a + i * _STACK_STRIDE for i, a in enumerate(arrays)]).astype(
                np.int64
            )
            self._stack = (stacked, starts, counts)
        return self._stack

    def _pool(self) -> npt.NDArray[np.int64]:
        if self._pooled is None:
            self._pooled = np.sort(np.concatenate([b.array() for b in self._buckets]))
        return self._pooled

    def _growth(self, q: float) -> float:
        """How far beyond g the q-quantile of a length known to exceed g lies, as a multiple
        of g, read from the longest lengths seen: under a scale-free tail, the top
        TAIL_FIT_SAMPLES divided by the smallest of them are a sample of L / t given L > t.
        (Only asked once a bucket has learned: the pool then holds MIN_SAMPLES or more.)"""
        top = self._pool()[-TAIL_FIT_SAMPLES:]
        ratios = top / float(max(top[0], 1))
        return float(ratios[min(int(q * ratios.shape[0]), ratios.shape[0] - 1)])

    def _prior_tokens(self, quantile: float) -> float:
        return PRIOR_MEDIAN_TOKENS * math.exp(PRIOR_SIGMA * NormalDist().inv_cdf(quantile))

    def _prior_beyond(
        self, quantile: float, generated: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The prior's prediction for requests that have generated `generated` tokens: its
        quantile, until the request outlives it; then, for a planning quantile (>= 0.5), the
        median of the prior's lengths longer than `generated`. Otherwise the request would be
        predicted to end at its next token, decision after decision, while the clock ran slow
        for it (conv 13B TP2 missed a 592-token answer so in its first 75 s). The median, not
        the planning quantile: the prior's tail (sigma ~1) is heavier than real traffic's, and
        its 90% quantile among longer lengths cost the 3-minute demo 4 points (and, on every
        prediction, conv 0.4-5.5 points). The low quantile that says how short a request may
        still be is left as it was."""
        unconditional = self._prior_tokens(quantile)
        out = np.maximum(unconditional, generated + 1).astype(np.float64)
        if quantile < 0.5:
            return out
        # Past the quantile is rare (long answers in unlearned buckets): one by one.
        normal = NormalDist()
        for i in np.nonzero(generated + 1 >= unconditional)[0]:
            g = int(generated[i])
            below = normal.cdf(math.log(g / PRIOR_MEDIAN_TOKENS) / PRIOR_SIGMA)
            share = min(below + 0.5 * (1.0 - below), 1.0 - 1e-12)
            out[i] = max(PRIOR_MEDIAN_TOKENS * math.exp(PRIOR_SIGMA * normal.inv_cdf(share)), g + 1)
        return out

    @property
    def bucket_count(self) -> int:
        return len(self._buckets)

    @property
    def window(self) -> int:
        return self._buckets[0].window

    def learned_lengths(self) -> tuple[tuple[int, ...], ...]:
        """Each prompt-length bucket's lengths, oldest first: what `restore` takes back."""
        return tuple(tuple(b.recent) for b in self._buckets)

    def restore(self, lengths: Sequence[Sequence[int]]) -> int:
        """Learn each bucket's lengths (oldest first, as `learned_lengths` gives them) as if
        those requests had just finished; returns how many were taken. The predictions made at
        their arrival are not known, so `error()` counts only requests finished from now."""
        if len(lengths) != len(self._buckets):
            raise ValueError(
                f"{len(lengths)} buckets of lengths for a predictor of {len(self._buckets)}"
            )
        taken = 0
        for bucket, seen in zip(self._buckets, lengths, strict=True):
            for tokens in seen:
                if tokens > 0:
                    bucket.add(int(tokens))
                    taken += 1
        self._pooled = None
        self._stack = None
        return taken

    def observe(self, prompt_tokens: int, output_tokens: int, predicted_at_arrival: int) -> None:
        """Learn from a finished request (not from cancelled ones: their length is unknown)."""
        if output_tokens <= 0:
            return
        self._bucket(prompt_tokens).add(output_tokens)
        self._pooled = None
        self._stack = None
        self._errors.append((predicted_at_arrival, output_tokens))

    def error(self) -> PredictorError:
        if not self._errors:
            return PredictorError(0, 0.0, 0.0)
        pct = [abs(p - t) / t for p, t in self._errors]
        under = [p < t for p, t in self._errors]
        return PredictorError(len(pct), sum(pct) / len(pct), sum(under) / len(under))
