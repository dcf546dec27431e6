"""Fused RoPE + head Hadamard + int4 KV store: the reference equals the engine's composition on the
CPU; the kernel builds for sm_90a (programmatic dependent launch, warp shuffles, no spills)."""

import re
import shutil

import pytest
import torch

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard, hadamard_factors
from kernels_tl.rope_kv_store import rope_kv_store_reference

SHAPES = [(32, 8, 128), (9, 3, 64), (28, 4, 128)]   # Llama-3-8B, SmolLM2, Qwen2.5-7B
BLOCK = 4
SYNC = "cudaGridDependencySynchronize();"


def _cache(num_blocks, kv_heads, head_dim, block=BLOCK):
    """A cache filled with sentinels (0xAB bytes, NaN metadata), so untouched slots are recognisable."""
    data = torch.full((num_blocks, kv_heads, block, head_dim // 2), 0xAB, dtype=torch.uint8)
    meta = torch.full((num_blocks, kv_heads, block, 2), float("nan"), dtype=torch.float16)
    return [data, meta, data.clone(), meta.clone()]


def _inputs(heads, kv_heads, head_dim, tokens, seed):
    from quad_engine.models.llama import rope_cos_sin
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).half()
    qkv[:, 5] *= 30  # an outlier channel (in Q head 0)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    positions = torch.randint(0, 8192, (tokens,), generator=g)
    cos, sin = rope_cos_sin(inv_freq, positions, 1.0)
    return qkv, cos, sin, g


def _engine_composition(qkv, cos, sin, slots, cache, heads, kv_heads, head_dim, hadamard):
    """What the engine computes today (models.llama.Attention.forward's elementwise path, then
    kv_ops.kv_store's reference path): apply_rope, the head Hadamard, float16 K / V into the cache."""
    from quad_engine.config import HadamardSpec
    from quad_engine.models.llama import apply_rope
    spec = HadamardSpec(size=head_dim, factors=hadamard_factors(head_dim)) if hadamard else None
    t, nq, nkv = qkv.shape[0], heads * head_dim, kv_heads * head_dim
    x = qkv.unsqueeze(0)                                                          # [b = 1, t, ...]
    q = x[..., :nq].view(1, t, heads, head_dim).transpose(1, 2)
    k = x[..., nq:nq + nkv].view(1, t, kv_heads, head_dim).transpose(1, 2)
    v = x[..., nq + nkv:].view(1, t, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos.unsqueeze(0), sin.unsqueeze(0)), apply_rope(k, cos.unsqueeze(0), sin.unsqueeze(0))
    if spec is not None:
        q = apply_hadamard(q.float(), spec.factors, spec.block)
        k = apply_hadamard(k.float(), spec.factors, spec.block)
    q, k, v = (y[0].transpose(0, 1).half() for y in (q, k, v))                     # [t, heads, hd]
    ref.kv_store(k.float(), v.float(), slots, *cache)
    return q, k, v


@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_reference_equals_the_engine_composition(heads, kv_heads, head_dim, hadamard):
    tokens = 37
    qkv, cos, sin, g = _inputs(heads, kv_heads, head_dim, tokens, seed=heads * 7 + head_dim)
    num_blocks = tokens // BLOCK + 5
    # Non-contiguous slots (a shuffled pool), padding rows (-1) among them.
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:tokens].int()
    slots[[0, 11, 12, 36]] = -1
    got_cache, want_cache = _cache(num_blocks, kv_heads, head_dim), _cache(num_blocks, kv_heads, head_dim)
    q, k_out, v_out = rope_kv_store_reference(qkv, cos, sin, slots, *got_cache, heads, kv_heads, head_dim,
                                              hadamard=hadamard, round_trip=True)
    q_want, k_want, v_want = _engine_composition(qkv, cos, sin, slots, want_cache, heads, kv_heads, head_dim,
                                                 hadamard)
    # The same float32 operations on the same values: equal bit for bit (NaN sentinels compared as bytes).
    assert q.dtype == torch.float16 and q.shape == (tokens, heads, head_dim)
    assert torch.equal(q, q_want)
    for got, want in zip(got_cache, want_cache):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # round_trip: every token (padding too), as the cache holds it.
    assert torch.equal(k_out, ref.fake_quant_kv(k_want.float(), 4, 1.0).half())
    assert torch.equal(v_out, ref.fake_quant_kv(v_want.float(), 4, 1.0).half())
    # Padding rows leave the cache untouched; every other slot of a written token is filled.
    expect = torch.zeros(num_blocks * BLOCK, dtype=torch.bool)
    expect[slots[slots >= 0].long()] = True
    for data, meta in (got_cache[:2], got_cache[2:]):
        written = ~meta.isnan().any(-1)                                       # [nb, kv_heads, block]
        assert torch.equal(written.all(1).flatten(), expect) and torch.equal(written.any(1).flatten(), expect)
        assert data.transpose(1, 2).flatten(0, 1)[~expect].eq(0xAB).all()
    # Without round_trip: the same cache, Q alone returned.
    cache2 = _cache(num_blocks, kv_heads, head_dim)
    q2 = rope_kv_store_reference(qkv, cos, sin, slots, *cache2, heads, kv_heads, head_dim, hadamard=hadamard)
    assert torch.equal(q2, q)
    for got, want in zip(cache2, got_cache):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_reference_matches_the_per_token_matrices():
    """The batched-matmul form the kernel replaces (rope_hadamard_matrices, float32) gives the same
    rotation up to float32 summation order."""
    from quad_engine.config import HadamardSpec
    from quad_engine.models.llama import rope_hadamard_matrices
    from kernels_tl.rope_kv_store import rope_hadamard_reference
    heads, kv_heads, head_dim = 4, 2, 128
    qkv, cos, sin, _ = _inputs(heads, kv_heads, head_dim, 9, seed=5)
    x = qkv.view(9, heads + 2 * kv_heads, head_dim)[:, :heads + kv_heads]
    spec = HadamardSpec(size=head_dim, factors=hadamard_factors(head_dim))
    want = torch.matmul(x.float(), rope_hadamard_matrices(cos, sin, spec))          # [t, rows, hd]
    got = rope_hadamard_reference(x, cos, sin)
    assert float((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("round_trip", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_kernel_builds_for_sm90(heads, kv_heads, head_dim, round_trip, tmp_path):
    pytest.importorskip("tilelang")
    from kernels_tl import pdl
    from kernels_tl.rope_kv_store import SM90, rope_kv_store
    from test_quantize_build import ptxas_spills
    src = rope_kv_store(heads, kv_heads, head_dim, target=SM90, round_trip=round_trip).get_kernel_source()
    head = src.index("__launch_bounds__")
    body = src[src.index("{", head):]
    if pdl.enabled("kv_store"):
        # Nothing before the wait for the previous kernel touches a kernel argument (global memory).
        assert body.count(SYNC) == 1
        params = re.findall(r"\b(\w+)\b(?=[,)])", src[src.index("(", head):src.index("{", head)])
        before = body[:body.index(SYNC)]
        touched = [p for p in params if re.search(rf"\b{p}\s*[\[+]", before)]
        assert not touched, f"reads or writes {touched} before waiting for the previous kernel"
    assert "__shfl_xor_sync" in body                      # RoPE partner and Hadamard stages: warp shuffles
    assert "nearbyintf" in body                           # kv_store's round-half-even
    assert "__fdividef" not in body and "__frcp" not in body
    assert "__shared__" not in body and "__syncthreads" not in body
    assert ("KO[" in body and "VO[" in body) == round_trip
    assert ptxas_spills(src, tmp_path) == [0, 0]


def test_engine_takes_the_fused_kernel_only_where_it_applies(monkeypatch):
    """kv_ops.fused_rope_store_supports: unless QUAD_FUSED_ROPE=0, with the kernels in use, the int4
    cache and a head Hadamard the kernel computes (one Sylvester matrix of order head_dim, or none)."""
    from types import SimpleNamespace

    from quad_engine import kv_ops
    from quad_engine.config import HadamardSpec

    def cfg(head_dim, spec):
        return SimpleNamespace(quantized=True, head_dim=head_dim, hadamard_head=spec)

    def cache(head_dim):
        return (torch.zeros(2, 1, 64, head_dim // 2, dtype=torch.uint8),)

    x = torch.zeros(1)
    sylvester = HadamardSpec(size=128, factors=[128])
    monkeypatch.setattr(kv_ops, "use_kernels", lambda t: True)
    monkeypatch.setenv("QUAD_FUSED_ROPE", "0")
    assert not kv_ops.fused_rope_store_supports(cfg(128, sylvester), x, cache(128))      # switched off
    monkeypatch.delenv("QUAD_FUSED_ROPE", raising=False)
    assert kv_ops.fused_rope_store_supports(cfg(128, sylvester), x, cache(128))         # on by default
    assert kv_ops.fused_rope_store_supports(cfg(64, None), x, cache(64))
    assert not kv_ops.fused_rope_store_supports(cfg(128, HadamardSpec(size=128, factors=[2, 64])), x, cache(128))
    assert not kv_ops.fused_rope_store_supports(cfg(96, HadamardSpec(size=96, factors=[12, 8])), x, cache(96))
    assert not kv_ops.fused_rope_store_supports(cfg(128, sylvester), x, None)
    monkeypatch.setattr(kv_ops, "use_kernels", lambda t: False)                           # CPU / reference backend
    assert not kv_ops.fused_rope_store_supports(cfg(128, sylvester), x, cache(128))
