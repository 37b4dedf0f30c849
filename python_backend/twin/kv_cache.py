"""Paged KV-cache block accounting, as TensorRT-LLM's block manager does it (without the bytes).

The cache is a pool of `max_num_blocks` blocks of `tokens_per_block` token positions each. A
sequence holds `ceil(positions / tokens_per_block)` blocks and grows one block at a time as it
generates. Under GUARANTEED_NO_EVICT the scheduler also *reserves* blocks for a request's whole
maximum length at admission; the reservation is bookkeeping (what admission may promise), the
held blocks are what the cache reports as used.

Invariants (checked by `check()` and the tests): held and reserved counts are never negative,
the blocks held never exceed the capacity, and a sequence that ends holds and reserves nothing.
"""

from __future__ import annotations

from .errors import KvCacheExhaustedError
from .executor_api import KvCacheStats

DEFAULT_TOKENS_PER_BLOCK = 64


class KvCacheManager:
    """Block pool of one engine (each GPU of a TP group holds its shard of every block)."""

    __slots__ = (
        "_held",
        "_reserved",
        "alloc_total_blocks",
        "enable_block_reuse",
        "max_num_blocks",
        "reserved_blocks",
        "tokens_per_block",
        "used_blocks",
    )

    def __init__(
        self,
        max_num_blocks: int,
        tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK,
        *,
        enable_block_reuse: bool = False,
    ) -> None:
        if max_num_blocks <= 0:
            raise ValueError(f"max_num_blocks must be positive, got {max_num_blocks}")
        if tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
        self.max_num_blocks = max_num_blocks
        self.tokens_per_block = tokens_per_block
        # Accepted for fidelity of the configuration; the twin's token ids are synthetic, so
        # no two prompts share a prefix and reuse would never hit.
        self.enable_block_reuse = enable_block_reuse
        self._held: dict[int, int] = {}
        self._reserved: dict[int, int] = {}
        self.used_blocks = 0
        self.reserved_blocks = 0
        self.alloc_total_blocks = 0  # cumulative allocations, as the real stats count them

    # ------------------------------------------------------------------ queries

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.tokens_per_block)

    @property
    def free_blocks(self) -> int:
        return self.max_num_blocks - self.used_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.max_num_blocks * self.tokens_per_block

    def held(self, seq_id: int) -> int:
        return self._held.get(seq_id, 0)

    def reserved(self, seq_id: int) -> int:
        return self._reserved.get(seq_id, 0)

    def can_reserve(self, blocks: int) -> bool:
        """Whether a reservation of `blocks` keeps every promise the pool has made."""
        return self.reserved_blocks + blocks <= self.max_num_blocks

    @property
    def num_sequences(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------------ changes

    def add_sequence(self, seq_id: int, tokens: int, *, reserve_tokens: int = 0) -> int:
        """Start holding blocks for `tokens` positions (and reserve `reserve_tokens`'s worth).

        Returns the blocks allocated.
        """
        if seq_id in self._held:
            raise KvCacheExhaustedError(f"sequence {seq_id} already holds blocks")
        blocks = self.blocks_for(tokens)
        if blocks > self.free_blocks:
            raise KvCacheExhaustedError(
                f"sequence {seq_id} needs {blocks} blocks, {self.free_blocks} free"
            )
        if reserve_tokens:
            reserve = max(self.blocks_for(reserve_tokens), blocks)
            if not self.can_reserve(reserve):
                raise KvCacheExhaustedError(
                    f"sequence {seq_id} reserves {reserve} blocks, "
                    f"{self.max_num_blocks - self.reserved_blocks} unpromised"
                )
            self._reserved[seq_id] = reserve
            self.reserved_blocks += reserve
        self._held[seq_id] = blocks
        self.used_blocks += blocks
        self.alloc_total_blocks += blocks
        return blocks

    def grow(self, seq_id: int, blocks: int = 1) -> None:
        """Give a running sequence `blocks` more blocks (it crossed a block boundary)."""
        if blocks > self.max_num_blocks - self.used_blocks:
            raise KvCacheExhaustedError(
                f"sequence {seq_id} needs {blocks} more blocks, {self.free_blocks} free"
            )
        self._held[seq_id] += blocks
        self.used_blocks += blocks
        self.alloc_total_blocks += blocks

    def free(self, seq_id: int) -> int:
        """Release everything `seq_id` holds or reserved (finish, cancel, pause). Idempotent."""
        blocks = self._held.pop(seq_id, 0)
        self.used_blocks -= blocks
        self.reserved_blocks -= self._reserved.pop(seq_id, 0)
        return blocks

    # ------------------------------------------------------------------ reporting

    def stats(self) -> KvCacheStats:
        """The executor's KvCacheStats. Without prefix reuse every allocation is new; with
        reuse enabled every one is also a miss (the lookup found nothing)."""
        return KvCacheStats(*self.stats_fields())

    def stats_fields(self) -> tuple[int, int, int, int, int, int, int, int, float]:
        """KvCacheStats' fields in declaration order (IterationStats builds it when read)."""
        total = self.alloc_total_blocks
        missed = total if self.enable_block_reuse else 0
        used = self.used_blocks
        tpb = self.tokens_per_block
        return (self.max_num_blocks, self.max_num_blocks - used, used, tpb, total, total, 0,
                missed, 0.0)  # fmt: skip

    def check(self) -> None:
        """Raise KvCacheExhaustedError if an invariant does not hold (for tests and debugging)."""
        problems = []
        if any(b < 0 for b in self._held.values()) or any(b < 0 for b in self._reserved.values()):
            problems.append("a sequence holds or reserves a negative number of blocks")
        if self.used_blocks != sum(self._held.values()):
            problems.append(f"used {self.used_blocks} != sum held {sum(self._held.values())}")
        if self.reserved_blocks != sum(self._reserved.values()):
            problems.append("reserved total does not match the reservations")
        if not 0 <= self.used_blocks <= self.max_num_blocks:
            problems.append(f"used {self.used_blocks} outside [0, {self.max_num_blocks}]")
        if not 0 <= self.reserved_blocks <= self.max_num_blocks:
            problems.append(f"reserved {self.reserved_blocks} outside [0, {self.max_num_blocks}]")
        if problems:
            raise KvCacheExhaustedError("; ".join(problems))
