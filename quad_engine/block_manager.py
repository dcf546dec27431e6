"""Paged KV-cache blocks: a reference-counted allocator and the per-sequence block tables.

The manager knows block ids and slots only; the tensors live in quad_engine.kv_cache. Reference
counts let a block be shared (prefix caching, forks) without changing this interface.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.refcount = [0] * num_blocks
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
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} is not allocated")
        self.refcount[block] += 1

    def free(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} freed twice")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_ids.append(block)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
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
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        self.tables[seq_id] = [self.allocator.allocate() for _ in range(self.blocks_needed(num_tokens))]

    def can_append(self, seq_id: int, new_len: int) -> bool:
        return self.blocks_needed(new_len) <= len(self.tables[seq_id]) or self.allocator.num_free > 0

    def append_slot(self, seq_id: int, new_len: int) -> None:
        """Grow the table so that it holds new_len tokens (a new block only at a block boundary)."""
        table = self.tables[seq_id]
        while len(table) < self.blocks_needed(new_len):
            table.append(self.allocator.allocate())

    def free(self, seq_id: int) -> None:
        for block in self.tables.pop(seq_id):
            self.allocator.free(block)

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end)."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
