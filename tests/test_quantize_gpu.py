"""Activation quantizers (fused RMSNorm + split + quantize, fused Hadamard + quantize) against the
reference on the GPU: fresh random inputs every run (rows with planted outliers, an all-zero row),
poisoned outputs. Scales must agree to float rounding; int8 values may differ only by one step, on
the few elements a different float summation order moves across a rounding boundary."""

import os

import pytest
import torch

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard, block_hadamard_size, hadamard_factors

pytestmark = pytest.mark.gpu

MS = [1, 3, 17, 100, 2053]
SEED = int.from_bytes(os.urandom(4), "little")
CLIP = 0.9


def activations(m: int, width: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """fp16 rows of varying magnitude; about one row in eight carries a planted outlier channel
    (5 to 50 times the row's std), row 0 is all zero when there is more than one row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    std = torch.rand(m, 1, generator=g, device="cuda") * spread + 0.1
    x = torch.randn(m, width, generator=g, device="cuda") * std
    rows = torch.randint(0, m, (max(1, m // 8),), generator=g, device="cuda")
    cols = torch.randint(0, width, (rows.numel(),), generator=g, device="cuda")
    sign = torch.randint(0, 2, (rows.numel(),), generator=g, device="cuda") * 2 - 1
    x[rows, cols] = (torch.rand(rows.numel(), generator=g, device="cuda") * 45 + 5) * std[rows, 0] * sign
    if m > 1:
        x[0] = 0
    return x.half()


def assert_quantized_close(q, s, q_ref, s_ref, what: str):
    assert not torch.isnan(s).any(), what
    rel = ((s.reshape(-1).double() - s_ref.reshape(-1).double()).abs() / s_ref.reshape(-1).double()).max().item()
    assert rel <= 1e-5, f"{what}: scale rel err {rel}"
    dq = q.to(torch.int32) - q_ref.to(torch.int32)
    assert dq.abs().max().item() <= 1, f"{what}: |Δq| = {dq.abs().max().item()}"
    # Allow a couple of boundary flips even on tiny tensors, where 1e-3 of the elements is < 1.
    mismatches = int((dq != 0).sum())
    assert mismatches <= 1e-3 * dq.numel() + 2, f"{what}: {mismatches} of {dq.numel()} q values differ"


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    """The reference Hadamard runs as fp32 matmuls: keep TF32 off for it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


# (rank, d): Llama-3-8B / Qwen2.5-7B hidden sizes widened by r outlier channels, SmolLM2, none.
NORM_SHAPES = [(0, 4096), (64, 4096), (128, 3584), (64, 576), (128, 8192)]


# The width rule's block (None) and the decode steps' (kernels_tl.quantize.DECODE_THREADS).
NORM_THREADS = [None, 512]


@pytest.mark.parametrize("threads", NORM_THREADS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("rank,d", NORM_SHAPES)
def test_rmsnorm_quant_matches_reference(rank, d, m, bits, threads):
    from kernels_tl.quantize import rmsnorm_quant
    seed = SEED + 1000 * m + rank + d + bits
    h = activations(m, rank + d, seed, spread=20.0)
    eps = 1e-5
    kernel = rmsnorm_quant(rank + d, rank, d, bits, CLIP, eps, threads=threads)
    x_out = torch.full((m, max(rank, 16)), float("nan"), device="cuda", dtype=torch.float16)
    x_q = torch.full((m, d), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(h, x_out, x_q, x_scale)
    out_ref, q_ref, s_ref = ref.rmsnorm_split_quant(h, rank, d, eps, bits, CLIP)
    what = f"rmsnorm r={rank} d={d} m={m} bits={bits} threads={threads} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    if rank:
        torch.testing.assert_close(x_out[:, :rank].float(), out_ref, rtol=1e-3, atol=1e-3, msg=what)
    else:
        assert torch.isnan(x_out).all(), f"{what}: x_out written with rank 0"
    if m > 1:  # the zero row: scale 1, all zeros
        assert x_scale[0].item() == 1.0 and not x_q[0].any()


def hadamard_spec(n: int):
    factors = hadamard_factors(n)
    if factors is None:
        block = block_hadamard_size(n)
        return hadamard_factors(block), block
    return factors, None


# Llama-3-8B (o / down), Qwen2.5-7B down, SmolLM2 o / down, Qwen2.5-7B o, Llama-2-7B down (block fallback).
HADAMARD_SIZES = [4096, 14336, 18944, 576, 1536, 3584, 11008]


def check_hadamard_quant(n: int, m: int, bits: int, **tuning):
    from kernels_tl.hadamard_quant import hadamard_quant
    seed = SEED + 1000 * m + n + bits
    factors, block = hadamard_spec(n)
    x = activations(m, n, seed)
    kernel = hadamard_quant(n, factors, block, bits, CLIP, **tuning)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(x, x_q, x_scale)
    q_ref, s_ref = ref.quantize_act(apply_hadamard(x.float(), factors, block), bits, CLIP)
    what = f"hadamard n={n} {factors} block={block} m={m} bits={bits} {tuning} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    deq, deq_ref = x_q.float() * x_scale.reshape(-1, 1), q_ref.float() * s_ref
    rel = float((deq - deq_ref).norm() / deq_ref.norm())
    assert rel < 1e-2, f"{what}: dequantized rel err {rel}"
    if m > 1:
        assert x_scale[0].item() == 1.0 and not x_q[0].any()


@pytest.mark.parametrize("m", [1, 17, 2053])
@pytest.mark.parametrize("rank,d", [(64, 4096), (64, 576), (0, 3584)])
@pytest.mark.parametrize("residual", ["float32", "add"])
@pytest.mark.parametrize("threads", NORM_THREADS)
def test_rmsnorm_quant_float32_residual_and_fused_add(rank, d, m, residual, threads):
    """The float32-residual variants: h read as float32 and rounded to float16 on load; with the
    fused add, h += d in place (bit-exact: one float32 add) before the norm."""
    from kernels_tl.quantize import rmsnorm_quant
    seed = SEED + 7 * m + rank + d
    h = activations(m, rank + d, seed, spread=20.0).float() * (1 + 1e-3 * torch.rand(m, rank + d, device="cuda"))
    delta = activations(m, rank + d, seed + 1)
    kernel = rmsnorm_quant(rank + d, rank, d, 4, CLIP, 1e-5, threads=threads, residual=residual)
    x_out = torch.full((m, max(rank, 16)), float("nan"), device="cuda", dtype=torch.float16)
    x_q = torch.full((m, d), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    want_h = h + delta.float() if residual == "add" else h.clone()
    args = (h, delta) if residual == "add" else (h,)
    kernel(*args, x_out, x_q, x_scale)
    assert torch.equal(h, want_h), "the residual after the kernel"
    out_ref, q_ref, s_ref = ref.rmsnorm_split_quant(want_h.half().float(), rank, d, 1e-5, 4, CLIP)
    what = f"rmsnorm {residual} r={rank} d={d} m={m} threads={threads} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    if rank:
        torch.testing.assert_close(x_out[:, :rank].float(), out_ref, rtol=1e-3, atol=1e-3, msg=what)


@pytest.mark.parametrize("m", [1, 5, 17, 64, 2053])
@pytest.mark.parametrize("rank,d", [(64, 4096), (64, 576), (0, 3584)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("threads", NORM_THREADS)
def test_rmsnorm_quant_takes_split_k_sums(rank, d, m, bits, threads):
    """The norm with a split-K GEMM's epilogue in its pass ("splitk") equals the epilogue kernel
    followed by the fused-add norm, bit for bit (residual, x_out, x_q, x_scale), and leaves the
    int32 sums zero as the epilogue kernel does; the residual equals torch's float32 epilogue."""
    from kernels_tl.gemm_decode import w4ax_epilogue
    from kernels_tl.quantize import rmsnorm_quant
    seed = SEED + 11 * m + rank + d + bits
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = rank + d
    h = activations(m, n, seed, spread=20.0).float() * (1 + 1e-3 * torch.rand(m, n, device="cuda"))
    acc = torch.randint(-2**21, 2**21, (m, n), generator=g, device="cuda", dtype=torch.int32)
    xs = torch.rand(m, generator=g, device="cuda") * 1e-3 + 1e-5
    ws = (torch.rand(n, generator=g, device="cuda") * 0.02 + 1e-3).half()

    def outputs():
        return (torch.full((m, max(rank, 16)), float("nan"), device="cuda", dtype=torch.float16),
                torch.full((m, d), 0x55, device="cuda", dtype=torch.int8),
                torch.full((m,), float("nan"), device="cuda"))
    # two kernels: the epilogue (float16 branch), then the fused-add norm
    acc_a, h_a, (xo_a, xq_a, xs_a) = acc.clone(), h.clone(), outputs()
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    zeros16 = torch.zeros(max(m, 1), 16, device="cuda", dtype=torch.float16)
    w4ax_epilogue(n, 0, False, "float16", 16)(acc_a, xs, ws, zeros16[:m], torch.zeros(n, 16, device="cuda").half(),
                                             torch.zeros(n, device="cuda").half(), y)
    rmsnorm_quant(n, rank, d, bits, CLIP, 1e-5, threads=threads, residual="add")(h_a, y, xo_a, xq_a, xs_a)
    # one kernel
    acc_b, h_b, (xo_b, xq_b, xs_b) = acc.clone(), h.clone(), outputs()
    rmsnorm_quant(n, rank, d, bits, CLIP, 1e-5, threads=threads, residual="splitk")(h_b, acc_b, xs, ws, xo_b, xq_b, xs_b)
    what = f"splitk norm r={rank} d={d} m={m} bits={bits} threads={threads} seed={seed}"
    torch_branch = (acc.float() * (xs[:, None] * ws.float()[None] * (1.0 / 16))).half()
    assert torch.equal(h_b, h + torch_branch.float()), what
    assert torch.equal(h_b, h_a) and torch.equal(xq_b, xq_a) and torch.equal(xs_b, xs_a), what
    if rank:
        assert torch.equal(xo_b[:, :rank], xo_a[:, :rank]), what
    assert not acc_b.any() and not acc_a.any(), f"{what}: the sums are left zero"


@pytest.mark.parametrize("prefetch_bytes", [16, 12345 * 16, 40 << 20])
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("residual", ["add", "splitk"])
def test_l2_prefetch_blocks_leave_the_norm_outputs_unchanged(residual, m, prefetch_bytes):
    """The norm with L2 prefetch blocks (kernels_tl.l2_prefetch) writes what it writes without them,
    bit for bit (residual, x_out, x_q, x_scale, the split-K sums left zero), and leaves the
    prefetched tensor as it was: one piece, a ragged last piece, more pieces than threads."""
    from kernels_tl.quantize import rmsnorm_quant
    rank, d, threads = 64, 4096, 512
    n = rank + d
    seed = SEED + 13 * m + prefetch_bytes % 1000
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = activations(m, n, seed, spread=20.0).float()
    branch = activations(m, n, seed + 1) if residual == "add" else torch.randint(
        -2**20, 2**20, (m, n), generator=g, device="cuda", dtype=torch.int32)
    extra = () if residual == "add" else (torch.rand(m, generator=g, device="cuda") * 1e-3 + 1e-5,
                                          (torch.rand(n, generator=g, device="cuda") * 0.02 + 1e-3).half())
    weights = torch.randint(0, 256, (prefetch_bytes,), generator=g, device="cuda", dtype=torch.uint8)
    kept = weights.clone()
    results = []
    for blocks in (0, 132):
        outs = (torch.full((m, rank), float("nan"), device="cuda", dtype=torch.float16),
                torch.full((m, d), 0x55, device="cuda", dtype=torch.int8),
                torch.full((m,), float("nan"), device="cuda"))
        hb, bb = h.clone(), branch.clone()
        kernel = rmsnorm_quant(n, rank, d, 4, CLIP, 1e-5, threads=threads, residual=residual, prefetch_blocks=blocks)
        kernel(hb, bb, *extra, *outs, *((weights,) if blocks else ()))
        results.append((hb, bb) + outs)
    what = f"prefetch {residual} m={m} bytes={prefetch_bytes} seed={seed}"
    for got, want in zip(results[1], results[0]):  # (the poison is NaN: an unwritten output fails)
        assert torch.equal(got, want), what
    assert torch.equal(weights, kept), f"{what}: the prefetched tensor changed"


@pytest.mark.parametrize("prefetch_bytes", [16, 12345 * 16, 40 << 20])
def test_l2_prefetch_kernel_runs_and_leaves_its_tensor(prefetch_bytes):
    """The prefetch kernel of its own (the o_proj / down_proj sites) runs, eagerly and replayed
    from a CUDA graph, and leaves the tensor it prefetches as it was."""
    from kernels_tl.l2_prefetch import l2_prefetch_kernel
    g = torch.Generator(device="cuda").manual_seed(SEED + prefetch_bytes % 1000)
    weights = torch.randint(0, 256, (prefetch_bytes,), generator=g, device="cuda", dtype=torch.uint8)
    kept = weights.clone()
    kernel = l2_prefetch_kernel(132)
    kernel(weights)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(weights, kept)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard_quant_matches_reference(n, m, bits):
    check_hadamard_quant(n, m, bits)


# Other launch shapes (hadamard_quant's tuning knobs) must compute the same thing.
TUNINGS = [
    (14336, dict(threads=256, cols_per_thread=1, min_blocks=3, max_radix=3)),
    (14336, dict(threads=512, cols_per_thread=1, min_blocks=2, max_radix=3)),
    (14336, dict(max_radix=3)),
    (4096, dict(max_radix=4, min_blocks=2)),
    (11008, dict(min_blocks=2)),
]


@pytest.mark.parametrize("m", [3, 2053])
@pytest.mark.parametrize("n,tuning", TUNINGS)
def test_hadamard_quant_tunings_match_reference(n, tuning, m):
    check_hadamard_quant(n, m, 4, **tuning)


@pytest.mark.parametrize("m", [1, 17, 2053])
@pytest.mark.parametrize("n", [14336, 1536, 18944])
def test_gated_hadamard_quant_matches_silu_times_up_then_reference(n, m):
    """The MLP variant: silu(gate) * up computed on load, as torch computes it in float16."""
    from kernels_tl.hadamard_quant import hadamard_quant
    seed = SEED + 31 * m + n
    factors, block = hadamard_spec(n)
    gate_up = activations(m, 2 * n, seed)
    kernel = hadamard_quant(n, factors, block, 8, CLIP, gated=True)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(gate_up, x_q, x_scale)
    x = ref.swiglu_f16(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(x, torch.nn.functional.silu(gate) * up)  # the spec is torch's float16 SwiGLU
    q_ref, s_ref = ref.quantize_act(apply_hadamard(x.float(), factors, block), 8, CLIP)
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, f"gated hadamard n={n} m={m} seed={seed}")


@pytest.mark.parametrize("m", [1, 17, 2053])
@pytest.mark.parametrize("kernel_shape", ["block", "cluster2", "cluster8"])
def test_fast_silu_variant_matches_the_reference_within_the_quantizer_tolerance(kernel_shape, m):
    """fast_silu (approximate exp and reciprocal in silu): its silu differs from torch's in a few
    float32 ulps, so a float16 SwiGLU value rounds the other way now and then; the codes must still
    pass the same tolerance against the reference as the exact kernels'."""
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_cluster import hadamard_quant_cluster
    n, seed = 14336, SEED + 7 * m
    factors, block = hadamard_spec(n)
    gate_up = activations(m, 2 * n, seed)
    if kernel_shape == "block":
        kernel = hadamard_quant(n, factors, block, 8, CLIP, gated=True, fast_silu=True)
    else:
        kernel = hadamard_quant_cluster(n, factors, 8, CLIP, cluster=int(kernel_shape[-1]), threads=256, gated=True,
                                        fast_silu=True)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(gate_up, x_q, x_scale)
    q_ref, s_ref = ref.quantize_act(apply_hadamard(ref.swiglu_f16(gate_up).float(), factors, block), 8, CLIP)
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, f"fast silu {kernel_shape} m={m} seed={seed}")


def test_dispatch_wrappers():
    from kernels_tl.hadamard_quant_dispatch import hadamard_quant_op
    from kernels_tl.quantize import rmsnorm_quant_op
    h = activations(2, 64 + 576, SEED)
    x_out, x_q, x_scale = rmsnorm_quant_op(h.reshape(1, 2, -1), 64, 576, 1e-5, 4, CLIP)
    assert x_out.shape == (1, 2, 64) and x_q.shape == (1, 2, 576) and x_scale.shape == (1, 2, 1)
    out_ref, q_ref, s_ref = ref.rmsnorm_split_quant(h, 64, 576, 1e-5, 4, CLIP)
    assert_quantized_close(x_q.reshape(2, -1), x_scale.reshape(-1), q_ref, s_ref, "rmsnorm_quant_op")
    factors, block = hadamard_spec(576)
    x = activations(5, 576, SEED + 1)
    x_q, x_scale = hadamard_quant_op(x.reshape(5, 1, 576), factors, block, 8, CLIP)
    assert x_q.shape == (5, 1, 576) and x_scale.shape == (5, 1, 1)
    q_ref, s_ref = ref.quantize_act(apply_hadamard(x.float(), factors, block), 8, CLIP)
    assert_quantized_close(x_q.reshape(5, -1), x_scale.reshape(-1), q_ref, s_ref, "hadamard_quant_op")


# The cluster variant (few tokens: the row split over a thread-block cluster). Llama-3-8B o / down,
# SmolLM2 down, Qwen2.5-7B o; plain and gated (silu(gate) * up on load).
CLUSTER_CASES = [(4096, False), (14336, False), (14336, True), (1536, True), (3584, False)]


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("cluster,threads", [(8, 256), (4, 128), (4, 512), (2, 256)])
@pytest.mark.parametrize("n,gated", CLUSTER_CASES)
def test_cluster_hadamard_quant_matches_reference(n, gated, cluster, threads, m):
    from kernels_tl.hadamard_quant_cluster import cluster_layout, hadamard_quant_cluster
    seed = SEED + 53 * m + n + cluster
    factors, block = hadamard_spec(n)
    assert cluster_layout(n, tuple(factors), block, cluster) is not None
    x = activations(m, 2 * n if gated else n, seed)
    kernel = hadamard_quant_cluster(n, factors, 4, CLIP, cluster=cluster, threads=threads, gated=gated)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(x, x_q, x_scale)
    src = ref.swiglu_f16(x) if gated else x
    q_ref, s_ref = ref.quantize_act(apply_hadamard(src.float(), factors, block), 4, CLIP)
    what = f"cluster hadamard n={n} gated={gated} C={cluster} threads={threads} m={m} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    if m > 1:
        assert x_scale[0].item() == 1.0 and not x_q[0].any()


def test_dispatch_takes_the_cluster_kernel_for_few_tokens_and_streams_long_prefills():
    """hadamard_quant_op at M = 2 (cluster), M = CLUSTER_MAX_TOKENS + 1 (one block per token) and
    odd counts past STREAM_MIN_TOKENS (streaming blocks, the dense factor on the tensor cores) on
    the gated 14336-wide row."""
    from kernels_tl.hadamard_quant_dispatch import (CLUSTER_MAX_TOKENS, STREAM_MIN_TOKENS, hadamard_quant_op,
                                                    kernel_choice)
    factors, block = hadamard_spec(14336)
    counts = (2, CLUSTER_MAX_TOKENS + 1, STREAM_MIN_TOKENS + 5, 2053)
    assert kernel_choice(2053, 14336, tuple(factors), block, True) == ("mma",)
    for m in counts:
        gate_up = activations(m, 2 * 14336, SEED + m)
        x_q, x_scale = hadamard_quant_op(gate_up, factors, block, 4, CLIP, gated=True)
        q_ref, s_ref = ref.quantize_act(apply_hadamard(ref.swiglu_f16(gate_up).float(), factors, block), 4, CLIP)
        assert_quantized_close(x_q, x_scale.reshape(-1), q_ref, s_ref, f"hadamard_quant_op gated m={m}")


# The streaming variant (persistent blocks, the next row copied with cp.async under the current
# one): the codes and scales of hadamard_quant's default launch shape, bit for bit, and so within
# the tolerance of the reference. A grid of 7 blocks makes every block walk many rows (odd counts,
# a last pass with idle blocks); the grid the dispatch launches, with fewer rows than blocks too.
STREAM_CASES = [(14336, True, True), (14336, True, False), (14336, False, False), (4096, False, False),
                (18944, True, True), (11008, False, False), (576, False, False)]


@pytest.mark.parametrize("m", [1, 100, 2053])
@pytest.mark.parametrize("grid", ["7", "dispatch"])
@pytest.mark.parametrize("n,gated,fast", STREAM_CASES)
def test_stream_hadamard_quant_matches_the_one_block_kernel(n, gated, fast, grid, m):
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_stream import hadamard_quant_stream, stream_blocks
    seed = SEED + 71 * m + n + gated
    factors, block = hadamard_spec(n)
    x = activations(m, 2 * n if gated else n, seed)
    blocks = 7 if grid == "7" else stream_blocks(n, factors, block, gated)
    kernel = hadamard_quant_stream(n, factors, block, 4, CLIP, blocks, gated=gated, fast_silu=fast)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    kernel(x, x_q, x_scale)
    want_q, want_s = torch.empty_like(x_q), torch.empty_like(x_scale)
    hadamard_quant(n, factors, block, 4, CLIP, gated=gated, fast_silu=fast)(x, want_q, want_s)
    what = f"stream hadamard n={n} gated={gated} fast={fast} blocks={blocks} m={m} seed={seed}"
    assert torch.equal(x_scale, want_s), what
    assert torch.equal(x_q, want_q), what
    src = ref.swiglu_f16(x) if gated else x
    q_ref, s_ref = ref.quantize_act(apply_hadamard(src.float(), factors, block), 4, CLIP)
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)


# The tensor-core variant of the gated streaming kernel (kernels_tl.hadamard_quant_mma): the dense
# factor as float16 products with float32 accumulation, so another float32 summation order than
# the scalar kernels' and the codes within the tolerance of the reference, not bit-equal to them.
# Rows scaled by 8 and by 1/256 (powers of two: the SwiGLU's float16 values stay exact) take the
# products to both ends of the float16 range.
@pytest.mark.parametrize("m", [1, 100, 2053])
@pytest.mark.parametrize("grid", ["7", "dispatch"])
@pytest.mark.parametrize("bits", [4, 8])
def test_mma_hadamard_quant_matches_the_reference(bits, grid, m):
    from kernels_tl.hadamard_quant_mma import hadamard_quant_mma
    from kernels_tl.hadamard_quant_stream import hadamard_quant_stream, stream_blocks
    n = 14336
    seed = SEED + 37 * m + bits
    factors, block = hadamard_spec(n)
    x = activations(m, 2 * n, seed)
    x[1::3] *= 8
    x[2::3] /= 256
    blocks = 7 if grid == "7" else stream_blocks(n, factors, block, True)
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    hadamard_quant_mma(n, factors, bits, CLIP, blocks)(x, x_q, x_scale)
    q_ref, s_ref = ref.quantize_act(apply_hadamard(ref.swiglu_f16(x).float(), factors, block), bits, CLIP)
    what = f"mma hadamard bits={bits} blocks={blocks} m={m} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    if m > 1:
        assert x_scale[0].item() == 1.0 and not x_q[0].any()
    want_q, want_s = torch.empty_like(x_q), torch.empty_like(x_scale)
    hadamard_quant_stream(n, factors, block, bits, CLIP, blocks, gated=True, fast_silu=True)(x, want_q, want_s)
    differ = float((x_q != want_q).float().mean())
    print(f"{what}: codes differing from the scalar stream kernel's {differ:.2e}, "
          f"scale max rel {float(((x_scale - want_s).abs() / want_s).max()):.1e}")


# The two-pass kernel of square plain rows (kernels_tl.hadamard_quant_square; QUAD_HADAMARD_SQUARE_MIN
# switches it on in the dispatch): its own float32 summation order, so the codes within the
# tolerance of the reference, and compared with the one-block kernel's. Rows scaled by 2^6 (the
# planted outliers stay finite in float16) and 2^-10 reach both ends of its range; odd token counts
# leave a block's second row empty.
@pytest.mark.parametrize("m", [1, 3, 100, 2053])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [4096, 1024])
@pytest.mark.parametrize("variant", [{}, {"stage_codes": True}, {"rows": 1}])
def test_square_hadamard_quant_matches_the_reference(n, bits, m, variant):
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_square import hadamard_quant_square
    seed = SEED + 53 * m + n + bits
    x = activations(m, n, seed)
    x[1::3] *= 64
    x[2::3] /= 1024
    assert torch.isfinite(x).all()
    x_q = torch.full((m, n), 0x55, device="cuda", dtype=torch.int8)
    x_scale = torch.full((m,), float("nan"), device="cuda")
    hadamard_quant_square(n, bits, CLIP, **variant)(x, x_q, x_scale)
    q_ref, s_ref = ref.quantize_act(apply_hadamard(x.float(), [n], None), bits, CLIP)
    what = f"square hadamard n={n} bits={bits} m={m} {variant} seed={seed}"
    assert_quantized_close(x_q, x_scale, q_ref, s_ref, what)
    if m > 1:
        assert x_scale[0].item() == 1.0 and not x_q[0].any()
    want_q, want_s = torch.empty_like(x_q), torch.empty_like(x_scale)
    hadamard_quant(n, (n,), None, bits, CLIP)(x, want_q, want_s)
    print(f"{what}: codes differing from the one-block kernel's {float((x_q != want_q).float().mean()):.2e}, "
          f"scale max rel {float(((x_scale - want_s).abs() / want_s).max()):.1e}")
