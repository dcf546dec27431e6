"""W4A4 / W4A8 GEMM kernel (int8-stored activations, packed int4 weights) against reference.quant_linear on the GPU: fresh inputs, poisoned outputs."""

import os

import pytest
import torch

from kernels_tl import reference as ref

pytestmark = pytest.mark.gpu

# (n, k): Llama-3-8B qkv / o / gate_up / down, Qwen2.5-7B qkv / down, SmolLM2 qkv / down (widened by r).
SHAPES = [(6144, 4096), (4160, 4096), (28672, 4096), (4160, 14336), (4608, 3584), (3648, 18944),
          (960, 576), (640, 1536)]
MS = [1, 3, 9, 17, 40, 100, 2053]  # GEMV, GEMV, decode kernel (16, 32 and 64 wide: fused or split-K), prefill
if os.environ.get("QUAD_GEMM_TEST_MS"):  # a subset, e.g. "9,17,40" for the decode kernels alone
    MS = [int(m) for m in os.environ["QUAD_GEMM_TEST_MS"].split(",")]


def operands(m, n, k, rank, act_bits, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lo, hi = (-8, 8) if act_bits == 4 else (-128, 128)
    xq = torch.randint(lo, hi, (m, k), generator=g, device="cuda", dtype=torch.int8)
    wq = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    xs = torch.rand(m, 1, generator=g, device="cuda") * 0.02 + 1e-3
    ws = (torch.rand(n, 1, generator=g, device="cuda") * 0.02 + 1e-3).half()
    xo = torch.randn(m, rank, generator=g, device="cuda").half() if rank else None
    wo = torch.randn(n, rank, generator=g, device="cuda").half() * 0.05 if rank else None
    return xq, xs, wq, ws, xo, wo


@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_integer_part_is_bit_exact(m, n, k, act_bits):
    from kernels_tl.gemm_dispatch import w4ax_linear
    xq, _, wq, _, _, _ = operands(m, n, k, 0, act_bits, seed=m * 7 + n)
    y = torch.full((m, n), float("nan"), device="cuda")
    ones_x, ones_w = torch.ones(m, device="cuda"), torch.ones(n, device="cuda", dtype=torch.float16)
    w4ax_linear(xq, ones_x, ref.pack_int4(wq), ones_w, out=y)
    # With unit scales Y is the int32 accumulator itself (exact in float32 below 2^24).
    assert torch.equal(y.double(), ref.int_matmul(xq, wq).double())


@pytest.mark.parametrize("rank", [0, 64])
@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES[:3] + SHAPES[6:])
def test_full_output_matches_reference(m, n, k, act_bits, rank):
    from kernels_tl.gemm_dispatch import w4ax_linear
    xq, xs, wq, ws, xo, wo = operands(m, n, k, rank, act_bits, seed=m + n + rank)
    bias = torch.randn(n, device="cuda").half()
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    w4ax_linear(xq, xs, ref.pack_int4(wq), ws, xo, wo, bias, out=y)
    expected = ref.quant_linear(xq, xs, wq, ws, xo, wo, bias)
    rel = float((y.float() - expected).norm() / expected.norm())
    assert not torch.isnan(y).any() and rel < 1e-3, rel


@pytest.mark.parametrize("m", [100, 2053])
@pytest.mark.parametrize("n,k,rank", [(6144, 4096, 64), (4160, 14336, 0)])
def test_prefill_gemm_scales_staged_or_read_give_the_same_output(m, n, k, rank):
    """gemm_rs's stage_scales (the tile's scales by cp.async into shared memory) against the epilogue
    reading them from global memory: bit-equal, also with the token edge inside a 4-scale piece (m = 2053)
    and with both scale vectors passed as views at an offset that is not 16-byte aligned (the dispatch
    copies those)."""
    from kernels_tl.gemm_dispatch import w4ax_linear
    from kernels_tl.gemm_plans import rs_tiles
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    xq, xs, wq, ws, xo, wo = operands(m, n, k, rank, 8, seed=m + 3 * n)
    wp, xs, ws = ref.pack_int4(wq), xs.reshape(-1), ws.reshape(-1)
    xo, wo = (xo, wo) if rank else (torch.zeros(m, 16, device="cuda").half(), torch.zeros(n, 16, device="cuda").half())
    bias = torch.zeros(n, device="cuda").half()
    ys = []
    for staged in (False, True):
        kernel = w4ax_gemm_rs(n, k, rank, False, "float16", **rs_tiles(m, n, k), stage_scales=staged)
        ys.append(torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16))
        kernel(xq, xs, wp, ws, xo, wo, bias, ys[-1])
    assert not torch.isnan(ys[0]).any() and torch.equal(ys[0], ys[1])
    xs_view, ws_view = torch.cat([xs.new_zeros(1), xs])[1:], torch.cat([ws.new_zeros(1), ws])[1:]
    assert xs_view.data_ptr() % 16 and ws_view.data_ptr() % 16
    y = w4ax_linear(xq, xs_view, wp, ws_view, xo if rank else None, wo if rank else None)
    assert torch.equal(y, ys[1])


def test_split_k_workspace_is_left_zero():
    """The split-K path's int32 workspace must be zero again after every call (CUDA graphs replay it)."""
    from kernels_tl import buffers, gemm_dispatch, gemm_plans
    assert gemm_plans.decode_plan(9, 4160, 4096)["split"] > 1
    xq, xs, wq, ws, _, _ = operands(9, 4160, 4096, 0, 4, seed=1)
    y1 = gemm_dispatch.w4ax_linear(xq, xs, ref.pack_int4(wq), ws)
    y2 = gemm_dispatch.w4ax_linear(xq, xs, ref.pack_int4(wq), ws)
    assert torch.equal(y1, y2)
    assert not buffers._buffers[("acc", torch.int32, xq.device, 4160)].any()


# gate_up GEMMs (2h rows, gate first): Llama-3-8B, Qwen2.5-7B, SmolLM2, with the outlier path.
SWIGLU_SHAPES = [(28672, 4096), (37888, 3584), (3072, 576)]


@pytest.mark.parametrize("fast_silu", [False, True])
@pytest.mark.parametrize("m", [100, 2053])
@pytest.mark.parametrize("n,k", SWIGLU_SHAPES)
def test_swiglu_epilogue_matches_gate_up_then_swiglu(n, k, m, fast_silu):
    """gemm_rs's swiglu epilogue (QUAD_FUSED_SWIGLU): silu(gate) * up of the float16 GEMM output, as
    torch computes it in float16 (bit-exact with the exact silu; with the approximate one within the
    gated quantizers' tolerance: a few float16 values round the other way)."""
    from kernels_tl import gemm_dispatch, gemm_plans
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    xq, xs, wq, ws, xo, wo = operands(m, n, k, 64, 4, seed=m + n + fast_silu)
    wp, bias = ref.pack_int4(wq), torch.zeros(n, device="cuda", dtype=torch.float16)
    gate_up = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    gemm_dispatch.w4ax_linear(xq, xs.reshape(-1), wp, ws.reshape(-1), xo, wo, out=gate_up)
    y = torch.full((m, n // 2), float("nan"), device="cuda", dtype=torch.float16)
    kernel = w4ax_gemm_rs(n, k, 64, False, "float16", **gemm_plans.rs_tiles(m, n, k), swiglu=True, fast_silu=fast_silu)
    kernel(xq, xs.reshape(-1), wp, ws.reshape(-1), xo, wo, bias, y)
    want = ref.swiglu_f16(gate_up)
    if not fast_silu:
        assert torch.equal(y, want)
    else:
        differ = (y != want).float().mean().item()
        rel = ((y.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)).max().item()
        assert not torch.isnan(y).any() and differ < 1e-3 and rel < 2e-3, (differ, rel)
