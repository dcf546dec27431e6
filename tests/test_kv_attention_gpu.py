"""Paged int4 KV cache kernels against the reference on the GPU: fresh inputs, poisoned outputs,
ragged lengths, non-contiguous block tables."""

import pytest
import torch

from kernels_tl import reference as ref

pytestmark = pytest.mark.gpu

# (heads, kv_heads, head_dim): Llama-3-8B, SmolLM2, Qwen2.5-7B
SHAPES = [(32, 8, 128), (9, 3, 64), (28, 4, 128)]


def random_cache(num_blocks, kv_heads, head_dim, block_size, g):
    data = torch.randint(0, 256, (num_blocks, kv_heads, block_size, head_dim // 2), generator=g, device="cuda",
                         dtype=torch.uint8)
    meta = torch.stack((torch.rand(num_blocks, kv_heads, block_size, generator=g, device="cuda") * 0.1 + 0.01,
                        torch.randint(0, 16, (num_blocks, kv_heads, block_size), generator=g, device="cuda").float()),
                       dim=-1).half()
    return data, meta


@pytest.mark.parametrize("round_trip", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 100, 2053])
def test_kv_store_is_bit_exact(heads, kv_heads, head_dim, tokens, round_trip):
    from kernels_tl.kv_store import BLOCK_SIZE, kv_store_op
    g = torch.Generator(device="cuda").manual_seed(tokens * 31 + head_dim)
    num_blocks = tokens // BLOCK_SIZE + 8
    k = torch.randn(tokens, kv_heads, head_dim, generator=g, device="cuda").half()
    v = torch.randn(tokens, kv_heads, head_dim, generator=g, device="cuda").half()
    k[:, :, 3] *= 20  # planted outlier channel
    v[0] = 0          # an all-zero row (scale 1)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g, device="cuda")[:tokens].int()
    slots[::7] = -1   # padding slots are skipped
    caches = [torch.full((num_blocks, kv_heads, BLOCK_SIZE, head_dim // 2), 0xAA, dtype=torch.uint8, device="cuda"),
              torch.full((num_blocks, kv_heads, BLOCK_SIZE, 2), float("nan"), dtype=torch.float16, device="cuda")] * 2
    caches = [c.clone() for c in caches]
    expected = [c.clone() for c in caches]
    out = kv_store_op(k, v, slots, *caches, round_trip=round_trip)
    ref.kv_store(k, v, slots, *expected)
    for got, want in zip(caches, expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    if round_trip:  # every token (padding slots too), as the cache holds it, rounded to float16
        for got, x in zip(out, (k, v)):
            assert torch.equal(got, ref.fake_quant_kv(x.float(), 4, 1.0).half())
    else:
        assert out is None


def decode_problem(heads, kv_heads, head_dim, batch, max_ctx, seed):
    """(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens) of a ragged decode batch: random
    lengths up to max_ctx (the first at max_ctx), every sequence on a random set of physical blocks
    (non-contiguous tables), random caches."""
    from kernels_tl.kv_attention import BLOCK_SIZE
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=g, device="cuda").int()
    lens[0] = max_ctx
    width = -(-max_ctx // BLOCK_SIZE)
    num_blocks = batch * width + 3
    tables = torch.randperm(num_blocks, generator=g, device="cuda")[: batch * width].view(batch, width).int()
    kd, km = random_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE, g)
    vd, vm = random_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE, g)
    q = torch.randn(batch, heads, head_dim, generator=g, device="cuda").half()
    return q, kd, km, vd, vm, tables, lens


# (1, True, None): the prefetch loop with decode_loop's register cap (4 blocks a SM on these sparse
# grids); (1, True, 5): capped for 5, as on dense ones
@pytest.mark.parametrize("stages,prefetch,min_blocks", [(1, False, None), (2, False, None), (1, True, None), (1, True, 5)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("batch,max_ctx", [(1, 1), (1, 4097), (5, 1000), (16, 300)])
@pytest.mark.parametrize("splits", [1, 4, 16])  # 16: one-block splits where the context allows
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, batch, max_ctx, splits, stages, prefetch,
                                            min_blocks):
    from kernels_tl.kv_attention import attention_decode_op
    q, kd, km, vd, vm, tables, lens = decode_problem(heads, kv_heads, head_dim, batch, max_ctx,
                                                     seed=batch * 1000 + max_ctx + splits)
    out = torch.full((batch, heads, head_dim), float("nan"), device="cuda", dtype=torch.float16)
    attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out, kernel="tile", num_stages=stages,
                        prefetch=prefetch, min_blocks=min_blocks)
    expected = ref.paged_attention(q, kd, km, vd, vm, tables.cpu(), lens.cpu())
    rel = float((out.float() - expected).norm() / expected.norm())
    assert not torch.isnan(out).any() and rel <= 1e-2, rel


# (32, 2, 128): a GQA group of 16, two n8 tiles of query rows.
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES + [(32, 2, 128)])
@pytest.mark.parametrize("batch,max_ctx", [(1, 1), (1, 4097), (5, 1000), (16, 300), (3, 65)])
@pytest.mark.parametrize("splits", [1, 4, 16])
# the next block in registers; a cp.async ring of 3; the output rescaled only when a max moves by 2^8
# (the default's slack), with either pipeline
@pytest.mark.parametrize("stages,slack", [(1, 0.0), (3, 0.0), (1, 8.0), (3, 8.0)],
                         ids=["registers", "ring3", "lazy8", "ring3_lazy8"])
def test_register_fragment_decode_attention_matches_reference(heads, kv_heads, head_dim, batch, max_ctx, splits,
                                                              stages, slack):
    from kernels_tl.kv_attention import attention_decode_op
    q, kd, km, vd, vm, tables, lens = decode_problem(heads, kv_heads, head_dim, batch, max_ctx,
                                                     seed=batch * 1000 + max_ctx + splits + 7)
    out = torch.full((batch, heads, head_dim), float("nan"), device="cuda", dtype=torch.float16)
    attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out, kernel="rf", rf_stages=stages,
                        rf_slack=slack)
    expected = ref.paged_attention(q, kd, km, vd, vm, tables.cpu(), lens.cpu())
    rel = float((out.float() - expected).norm() / expected.norm())
    assert not torch.isnan(out).any() and rel <= 1e-2, rel


def prefill_problem(heads, kv_heads, head_dim, query_lens, prefix_lens, seed):
    """(q, k_data, k_meta, v_data, v_meta, block_tables, context lens) of a packed prefill batch:
    query_lens new tokens after prefix_lens cached ones per sequence, every sequence on a random set
    of physical blocks (non-contiguous tables), random caches."""
    from kernels_tl.kv_attention import BLOCK_SIZE
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    width = max(-(-n // BLOCK_SIZE) for n in lens)
    num_blocks = len(lens) * width + 5
    tables = torch.randperm(num_blocks, generator=g, device="cuda")[: len(lens) * width].view(len(lens), width).int()
    kd, km = random_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE, g)
    vd, vm = random_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE, g)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g, device="cuda").half()
    return q, kd, km, vd, vm, tables, lens


# (query lens, cached prefix lens): prefixes not multiples of the block size, one without a prefix,
# one longer than a 64-row tile, a single-token chunk.
PREFILL_BATCHES = [([37, 100, 1, 64], [70, 0, 200, 64]), ([300], [1000]), ([5, 130], [0, 3])]


# (num_stages, rows, threads, prefetch): the default, the pipelined loop, the register-prefetch
# loop, 128-row programs without and with it.
PREFILL_VARIANTS = [(1, 64, 128, False), (2, 64, 128, False), (1, 64, 128, True), (1, 128, 256, False),
                    (1, 128, 256, True)]


@pytest.mark.parametrize("stages,rows,threads,prefetch", PREFILL_VARIANTS)
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("query_lens,prefix_lens", PREFILL_BATCHES)
def test_prefill_attention_with_cached_prefix_matches_reference(heads, kv_heads, head_dim, query_lens, prefix_lens,
                                                                 stages, rows, threads, prefetch):
    from kernels_tl.attention_prefill import attention_prefill, prefill_tiles, tokens_per_tile
    q, kd, km, vd, vm, tables, lens = prefill_problem(heads, kv_heads, head_dim, query_lens, prefix_lens,
                                                      seed=sum(query_lens) * 7 + head_dim)
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor([sum(query_lens[:i]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
    tiles = prefill_tiles(query_lens, tokens_per_tile(heads, kv_heads, rows)).cuda()
    attention_prefill(heads, kv_heads, head_dim, num_stages=stages, rows=rows, threads=threads, prefetch=prefetch)(
        q, kd, km, vd, vm, tables, torch.tensor(lens, dtype=torch.int32, device="cuda"), starts,
        torch.tensor(query_lens, dtype=torch.int32, device="cuda"), tiles, out)
    expected = ref.paged_attention(q, kd, km, vd, vm, tables.cpu(), torch.tensor(lens), torch.tensor(query_lens))
    assert not torch.isnan(out).any(), "rows left unwritten"
    rel = float((out.float() - expected).norm() / expected.norm())
    assert rel <= 1e-2, rel


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("query_lens,prefix_lens", PREFILL_BATCHES)
def test_prefill_attention_through_flash_over_the_dequantized_cache(heads, kv_heads, head_dim, query_lens,
                                                                     prefix_lens):
    """QUAD_PREFILL_ATTENTION=sdpa: each sequence's cache gathered and dequantized by the kernel
    (bit-exact against the reference's dequantization rounded to float16), then SDPA with the causal
    mask aligned to the bottom right, within 1e-2 of the reference."""
    from kernels_tl.attention_prefill import attention_prefill_sdpa_op
    from kernels_tl.kv_dequant import gather_dequant
    q, kd, km, vd, vm, tables, lens = prefill_problem(heads, kv_heads, head_dim, query_lens, prefix_lens,
                                                      seed=sum(query_lens) * 11 + head_dim)
    for i, n in enumerate(lens):
        got = gather_dequant(kd, km, tables[i], n)
        want = ref.gather_kv(kd, km, tables[i], n).half().transpose(0, 1)
        assert torch.equal(got, want)
    out = attention_prefill_sdpa_op(q, kd, km, vd, vm, tables, lens, query_lens)
    expected = ref.paged_attention(q, kd, km, vd, vm, tables.cpu(), torch.tensor(lens), torch.tensor(query_lens))
    rel = float((out.float() - expected.to(out.device)).norm() / expected.norm())
    assert out.shape == q.shape and rel <= 1e-2, rel

