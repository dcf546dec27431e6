"""Paged KV-cache blocks: reference counts, slot arithmetic over non-contiguous tables, and no leaks
or shared blocks after many random requests."""

import random

import pytest

from quad_engine.block_manager import BlockAllocator, BlockManager


def test_allocator_counts_references_and_reuses_a_block_only_when_the_last_owner_frees_it():
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(), alloc.allocate()
    assert a != b and alloc.num_free == 1
    alloc.incref(a)                     # a second owner (a fork)
    alloc.free(a)
    assert alloc.refcount[a] == 1 and alloc.num_free == 1 and a not in alloc.free_ids
    alloc.free(a)
    assert alloc.refcount[a] == 0 and alloc.num_free == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(a)
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.incref(a)
    with pytest.raises(IndexError, match="does not exist"):
        alloc.free(-1)                  # would otherwise free the last block
    alloc.allocate(), alloc.allocate()
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        alloc.allocate()
    assert alloc.refcount[b] == 1       # the failed call changed nothing


def test_slot_mapping_follows_non_contiguous_tables():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 3)                   # block 0
    bm.allocate(1, 6)                   # blocks 1, 2
    bm.free(0)                          # block 0 goes to the back of the free list
    bm.allocate(2, 9)                   # blocks 3, 4, 5
    bm.append_slot(2, 13)               # crosses into a fourth block
    assert bm.block_table(2) == [3, 4, 5, 6]
    bm.free(1)                          # free list: 7, 0, 1, 2
    bm.allocate(3, 4)                   # block 7
    bm.append_slot(2, 17)               # the fifth block is recycled block 0, far from the others
    bm.append_slot(3, 5)                # block 1, below its first block
    assert bm.block_table(2) == [3, 4, 5, 6, 0] and bm.block_table(3) == [7, 1]
    assert bm.slot_mapping(2, 2, 6) == [14, 15, 16, 17]
    assert bm.slot_mapping(2, 15, 17) == [6 * 4 + 3, 0]
    assert bm.slot_mapping(3, 2, 6) == [7 * 4 + 2, 7 * 4 + 3, 4, 5]
    assert bm.slot_mapping(2, 5, 5) == []
    with pytest.raises(IndexError):
        bm.slot_mapping(2, 0, 21)       # past the table: would address another sequence's block


def test_append_allocates_only_at_a_block_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 1)
    for new_len, blocks in [(2, 1), (4, 1), (5, 2), (8, 2), (9, 3)]:
        assert bm.can_append(0, new_len)
        bm.append_slot(0, new_len)
        assert len(bm.block_table(0)) == blocks and bm.num_free_blocks == 4 - blocks
    assert bm.can_append(0, 16) and not bm.can_append(0, 17)
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.append_slot(0, 17)
    assert len(bm.block_table(0)) == 3  # a failed append takes nothing


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.can_allocate(16) and not bm.can_allocate(17)
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.allocate(0, 17)
    assert bm.num_free_blocks == 4 and 0 not in bm.tables
    bm.allocate(0, 1)
    with pytest.raises(RuntimeError, match="already has blocks"):
        bm.allocate(0, 1)


@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_a_thousand_random_requests_leave_no_leak_and_never_share_a_block(block_size):
    rng = random.Random(block_size)
    num_blocks = 48
    bm = BlockManager(num_blocks, block_size)
    lengths: dict[int, int] = {}       # live sequence -> tokens its table must hold
    extra_refs: list[int] = []          # forks: extra owners of some live block
    started = finished = preempted = 0
    while started < 1000 or lengths:
        action = rng.random()
        if started < 1000 and action < 0.2:
            n = rng.randint(1, 3 * block_size)
            if bm.can_allocate(n):
                bm.allocate(started, n)
                lengths[started] = n
                started += 1
        elif lengths and action < 0.85:
            seq = rng.choice(list(lengths))
            if bm.can_append(seq, lengths[seq] + 1):
                lengths[seq] += 1
                bm.append_slot(seq, lengths[seq])
            else:                       # preempt: everything it holds goes back
                bm.free(seq)
                del lengths[seq]
                preempted += 1
        elif lengths and action < 0.95:
            seq = rng.choice(list(lengths))
            bm.free(seq)
            del lengths[seq]
            finished += 1
        elif lengths and action < 0.97:
            block = rng.choice(bm.block_table(rng.choice(list(lengths))))
            bm.allocator.incref(block)
            extra_refs.append(block)
        elif extra_refs:
            bm.allocator.free(extra_refs.pop(rng.randrange(len(extra_refs))))

        owned = [b for seq in lengths for b in bm.block_table(seq)]
        owned_set = set(owned)
        assert len(owned) == len(owned_set), "a block is in two live tables"
        for seq, n in lengths.items():
            assert len(bm.block_table(seq)) == bm.blocks_needed(n)
        extra = {b: extra_refs.count(b) for b in extra_refs}
        for b in range(num_blocks):
            expected = (b in owned_set) + extra.get(b, 0)
            assert bm.allocator.refcount[b] == expected
            assert (b in bm.allocator.free_ids) == (expected == 0)
    for block in extra_refs:            # forks outliving their sequence still hold their block
        assert bm.num_free_blocks < num_blocks
        bm.allocator.free(block)
    assert preempted > 0 and finished > 0
    assert bm.num_free_blocks == num_blocks and not any(bm.allocator.refcount) and not bm.tables
    assert sorted(bm.allocator.free_ids) == list(range(num_blocks))
