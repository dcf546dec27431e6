"""Paged KV-cache blocks: a reference-counted allocator and the per-sequence block tables.

The manager knows block ids and slots only; the tensors live in quad_engine.kv_cache. Reference
counts let a block be shared (prefix caching, forks) without changing this interface.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.refcount = [0] * num_blocks
        # FIFO: a freed block goes to the back, so tables become non-contiguous quickly and any
        # kernel that wrongly assumes contiguous blocks fails in tests rather than in production.
        self.free_ids = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("out of KV-cache blocks")
        block = self.free_ids.popleft()
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        """One more owner of an allocated block (a fork, or a cached prefix)."""
        if self._refcount(block) == 0:
            raise RuntimeError(f"block {block} is not allocated")
        self.refcount[block] += 1

    def free(self, block: int) -> None:
        """Drop one owner; the block is reusable once the last owner is gone."""
        if self._refcount(block) == 0:
            raise RuntimeError(f"block {block} freed twice (it is not allocated)")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_ids.append(block)

    def _refcount(self, block: int) -> int:
        # A negative id would silently index from the end of the list.
        if not 0 <= block < len(self.refcount):
            raise IndexError(f"block {block} does not exist (the cache has {len(self.refcount)} blocks)")
        return self.refcount[block]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.allocator.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Blocks for a sequence's first num_tokens tokens (its prompt, or prompt + output on resume)."""
        if seq_id in self.tables:
            raise RuntimeError(f"sequence {seq_id} already has blocks")
        # Check first: failing half-way would leak the blocks taken so far.
        if not self.can_allocate(num_tokens):
            raise RuntimeError(f"out of KV-cache blocks: {num_tokens} tokens need {self.blocks_needed(num_tokens)} "
                               f"blocks, {self.num_free_blocks} free")
        self.tables[seq_id] = [self.allocator.allocate() for _ in range(self.blocks_needed(num_tokens))]

    def can_append(self, seq_id: int, new_len: int) -> bool:
        return self.blocks_needed(new_len) - len(self.tables[seq_id]) <= self.allocator.num_free

    def append_slot(self, seq_id: int, new_len: int) -> None:
        """Grow the table so that it holds new_len tokens (a new block only at a block boundary)."""
        if not self.can_append(seq_id, new_len):
            raise RuntimeError(f"out of KV-cache blocks: sequence {seq_id} cannot grow to {new_len} tokens")
        table = self.tables[seq_id]
        while len(table) < self.blocks_needed(new_len):
            table.append(self.allocator.allocate())

    def free(self, seq_id: int) -> None:
        for block in self.tables.pop(seq_id):
            self.allocator.free(block)

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    def slot(self, seq_id: int, pos: int) -> int:
        """Cache slot of token position pos (a decode step's one new token)."""
        table, bs = self.tables[seq_id], self.block_size
        if pos >= len(table) * bs:
            raise IndexError(f"sequence {seq_id} has blocks for {len(table) * bs} tokens, not {pos + 1}")
        return table[pos // bs] * bs + pos % bs

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end)."""
        table, bs = self.tables[seq_id], self.block_size
        if end > len(table) * bs:
            raise IndexError(f"sequence {seq_id} has blocks for {len(table) * bs} tokens, not {end}")
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
