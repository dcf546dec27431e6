"""Fused RoPE + head Hadamard + int4 KV store against the reference on the GPU: fresh inputs, poisoned
outputs and cache, ragged token counts, padding slots, a shuffled block pool."""

import pytest
import torch

from kernels_tl import reference as ref

pytestmark = pytest.mark.gpu

# (heads, kv_heads, head_dim): Llama-3-8B, SmolLM2, Qwen2.5-7B
SHAPES = [(32, 8, 128), (9, 3, 64), (28, 4, 128)]
POISON_BYTE = 0xAB


def _poisoned_cache(num_blocks, kv_heads, head_dim, block_size):
    data = torch.full((num_blocks, kv_heads, block_size, head_dim // 2), POISON_BYTE, dtype=torch.uint8, device="cuda")
    meta = torch.full((num_blocks, kv_heads, block_size, 2), float("nan"), dtype=torch.float16, device="cuda")
    return [data, meta, data.clone(), meta.clone()]


def _nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")


def _inputs(heads, kv_heads, head_dim, tokens, seed):
    from quad_engine.models.llama import rope_cos_sin
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = heads + 2 * kv_heads
    qkv = (torch.randn(tokens, rows, head_dim, generator=g, device="cuda") * 2).half()
    qkv[:, heads, 3] *= 30               # an outlier channel in K head 0 (spread by the Hadamard)
    qkv[0, heads:] = 0                   # an all-zero K and V row (scale 1)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    positions = torch.randint(0, 8192, (tokens,), generator=g, device="cuda")
    cos, sin = rope_cos_sin(inv_freq, positions, 1.0)
    return qkv.view(tokens, rows * head_dim), cos, sin, g


def _kernel_rotation(kernel, qkv, cos, sin, heads, kv_heads, head_dim, block_size, round_trip):
    """The kernel's own float16 rotated K: the same kernel run on a copy of qkv whose first kv_heads
    Q heads hold the K heads. Q and K rows run the same instructions up to the float16 rounding (the
    K row then converts that float16 back for its quantization), so these Q outputs are, bit for
    bit, the K the kernel quantized; with every slot -1 nothing is stored."""
    tokens = qkv.shape[0]
    x = qkv.view(tokens, heads + 2 * kv_heads, head_dim).clone()
    x[:, :kv_heads] = x[:, heads:heads + kv_heads]
    q = _nan(tokens, heads, head_dim)
    slots = torch.full((tokens,), -1, dtype=torch.int32, device="cuda")
    scratch = _poisoned_cache(1, kv_heads, head_dim, block_size)
    extra = (_nan(tokens, kv_heads, head_dim), _nan(tokens, kv_heads, head_dim)) if round_trip else ()
    kernel(x.view(tokens, -1), cos, sin, slots, *scratch, q, *extra)
    return q[:, :kv_heads]


def _check(heads, kv_heads, head_dim, tokens, round_trip, hadamard=True, clip=1.0):
    from kernels_tl.rope_kv_store import (BLOCK_SIZE, rope_hadamard_reference, rope_kv_store, rope_kv_store_op,
                                          rope_kv_store_reference)
    qkv, cos, sin, g = _inputs(heads, kv_heads, head_dim, tokens, seed=tokens * 31 + head_dim + heads)
    rows = heads + 2 * kv_heads
    num_blocks = tokens // BLOCK_SIZE + 8
    # A shuffled pool: consecutive tokens land in unrelated blocks and offsets; every 7th from the
    # second on is padding (a single token is stored).
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g, device="cuda")[:tokens].int()
    slots[1::7] = -1
    cache = _poisoned_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE)
    kernel = rope_kv_store(heads, kv_heads, head_dim, BLOCK_SIZE, clip, hadamard, round_trip=round_trip)
    q = _nan(tokens, heads, head_dim)
    k_out, v_out = _nan(tokens, kv_heads, head_dim), _nan(tokens, kv_heads, head_dim)
    kernel(qkv, cos, sin, slots, *cache, q, *((k_out, v_out) if round_trip else ()))
    torch.cuda.synchronize()

    x = qkv.view(tokens, rows, head_dim)
    want = rope_hadamard_reference(x[:, :heads + kv_heads], cos, sin, hadamard)   # float32, not rounded
    # Q: every token (padding included), within float16 rounding plus summation order of the float32.
    assert not q.isnan().any(), "Q rows left unwritten"
    rel = float((q.float() - want[:, :heads]).norm() / want[:, :heads].norm())
    assert rel <= 1e-3, rel
    if not hadamard:  # RoPE alone: the same rounded float32 products and sum as torch
        assert torch.equal(q, want[:, :heads].half())

    # K: the kernel's own float16 rotation, itself within float16 rounding of the reference.
    k16 = _kernel_rotation(kernel, qkv, cos, sin, heads, kv_heads, head_dim, BLOCK_SIZE, round_trip)
    assert not k16.isnan().any()
    k_want = want[:, heads:]
    # (A single token's K is the all-zero row: an absolute floor keeps 0 / 0 out of the bound.)
    err = float((k16.float() - k_want).norm())
    assert err <= 1e-3 * float(k_want.norm()) + 1e-6, err
    if not hadamard:
        assert torch.equal(k16, k_want.half())
    v16 = x[:, heads + kv_heads:]

    # The cache: reference.kv_store of that K and of the input V, bit for bit (metadata compared as
    # bytes so NaN poison counts); padding slots keep their poison.
    expected = _poisoned_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE)
    ref.kv_store(k16.float(), v16.float(), slots, *expected, clip=clip)
    for got, exp in zip(cache, expected):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    keep = slots >= 0
    blocks, offsets = slots[keep].long() // BLOCK_SIZE, slots[keep].long() % BLOCK_SIZE
    untouched = torch.ones(num_blocks, BLOCK_SIZE, dtype=torch.bool, device="cuda")
    untouched[blocks, offsets] = False
    for data, meta in (cache[:2], cache[2:]):
        assert data.transpose(1, 2)[untouched].eq(POISON_BYTE).all()
        assert meta.transpose(1, 2)[untouched].isnan().all()

    # Independent of how k16 was obtained: the dequantized cache is within int4 error of the float32
    # reference K (half a step, the float16 scale's shrink, the float16 rounding of K).
    kd, km = cache[0][blocks, :, offsets], cache[1][blocks, :, offsets].float()      # [n, kv_heads, ...]
    scale, zero = km[..., :1], km[..., 1:]
    deq = ref.dequantize_kv(ref.unpack_kv(kd), scale, zero)
    err = (deq - k_want[keep]).abs()
    if clip == 1.0:
        assert (err <= scale * (0.5 + 15 * 2.0 ** -11) + k_want[keep].abs() * 2.0 ** -10 + 1e-4).all()

    if round_trip:
        # Every token, as the cache holds it: dequantized codes rounded to float16; for stored tokens,
        # literally the codes in the cache.
        for got, val, (data, meta) in ((k_out, k16, cache[:2]), (v_out, v16, cache[2:])):
            assert torch.equal(got, ref.fake_quant_kv(val.float(), 4, clip).half())
            stored = ref.dequantize_kv(ref.unpack_kv(data[blocks, :, offsets]), meta[blocks, :, offsets, :1].float(),
                                       meta[blocks, :, offsets, 1:].float())
            assert torch.equal(got[keep], stored.half())

    # The op (outputs from torch.empty) and the reference function agree with the direct call.
    cache_op = _poisoned_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE)
    out = rope_kv_store_op(qkv, cos, sin, slots, *cache_op, heads, kv_heads, head_dim, clip=clip, hadamard=hadamard,
                           round_trip=round_trip)
    outs = out if round_trip else (out,)
    for got, exp in zip(outs, (q, k_out, v_out)):
        assert torch.equal(got, exp)
    for got, exp in zip(cache_op, cache):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))
    cache_ref = _poisoned_cache(num_blocks, kv_heads, head_dim, BLOCK_SIZE)
    out_ref = rope_kv_store_reference(qkv, cos, sin, slots, *cache_ref, heads, kv_heads, head_dim, clip=clip,
                                      hadamard=hadamard, round_trip=round_trip)
    q_ref = out_ref[0] if round_trip else out_ref
    # float16 results of a different float32 summation order: a rounding boundary apart at most.
    assert torch.allclose(q.float(), q_ref.float(), rtol=2.0 ** -10, atol=1e-3)


@pytest.mark.parametrize("round_trip", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 100, 2053])
def test_rope_kv_store_matches_reference(heads, kv_heads, head_dim, tokens, round_trip):
    _check(heads, kv_heads, head_dim, tokens, round_trip)


@pytest.mark.parametrize("hadamard,clip", [(False, 1.0), (True, 0.9)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("tokens", [3, 2053])
def test_rope_only_and_clipped_variants(heads, kv_heads, head_dim, tokens, hadamard, clip):
    _check(heads, kv_heads, head_dim, tokens, True, hadamard, clip)
