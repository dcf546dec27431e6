"""The GEMV with the next norm in its last block (gemm_dispatch.w4ax_linear_norm, QUAD_GEMV_NORM=1)
against the two kernels it replaces, the GEMV and rmsnorm_quant(residual="add"), on the GPU: fresh
inputs, poisoned outputs. Where the norm kernel runs a block of the GEMV's 128 threads (widths up to
5 vectors of 8 a thread, all model shapes here) the two are the same arithmetic in the same order:
every output is compared bit for bit."""

import pytest
import torch

from kernels_tl import reference as ref

pytestmark = pytest.mark.gpu

# (n = rank + d, k, rank): Llama-3-8B o_proj / down_proj writing a 64 + 4096 residual, Qwen2.5-7B
# o_proj (64 + 3584), SmolLM2 down_proj (64 + 576), a residual without outlier channels.
SHAPES = [(4160, 4096, 64), (4160, 14336, 64), (3648, 3584, 64), (640, 1536, 64), (1024, 512, 0)]
NORMS = [(4, 0.9), (8, 0.9), (8, 1.0)]  # (bits, clip): qkv / gate_up norms of W4A4 and W4A4A8, the int8 head's


@pytest.fixture(scope="module", autouse=True)
def built():
    """Every kernel these tests run, compiled in parallel up front."""
    from kernels_tl import gemm_dispatch
    from kernels_tl.quantize import rmsnorm_quant
    gemm_dispatch.prebuild_gemv_norm([(m, n, k, False, (rank, n - rank, bits, clip, 1e-5)) for n, k, rank in SHAPES
                                      for bits, clip in NORMS for m in (1, 2, 4)])
    gemm_dispatch.prebuild([(m, n, k, 0, False, "float16") for n, k, _ in SHAPES for m in (1, 2, 4)])
    for n, _, rank in SHAPES:
        for bits, clip in NORMS:
            rmsnorm_quant(n, rank, n - rank, bits, clip, 1e-5, residual="add")


def operands(m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
    wq = ref.pack_int4(torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8))
    xs = torch.rand(m, generator=g, device="cuda") * 0.02 + 1e-3
    ws = (torch.rand(n, generator=g, device="cuda") * 0.02 + 1e-3).half()
    h = torch.randn(m, n, generator=g, device="cuda") * 4
    h[:, :8] *= 30  # outlier channels
    return xq, xs, wq, ws, h


@pytest.mark.parametrize("bits,clip", NORMS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,rank", SHAPES)
def test_linear_norm_equals_the_two_kernels(n, k, rank, m, bits, clip):
    from kernels_tl import buffers, gemm_dispatch
    from kernels_tl.quantize import rmsnorm_quant_op
    xq, xs, wq, ws, h = operands(m, n, k, seed=n + k + m * 13 + bits)
    d = n - rank
    h_two, h_one = h.clone(), h.clone()
    y_two = gemm_dispatch.w4ax_linear(xq, xs, wq, ws)
    want = rmsnorm_quant_op(h_two, rank, d, 1e-5, bits, clip, residual=y_two)
    for _ in range(3):  # the arrival count is left at zero for the next call
        h_one.copy_(h)
        y, x_out, x_q, x_s = gemm_dispatch.w4ax_linear_norm(xq, xs, wq, ws, None, h_one, (rank, d, bits, clip, 1e-5))
        assert torch.equal(y, y_two) and torch.equal(h_one, h_two)
        assert torch.equal(x_out, want[0]) and torch.equal(x_q, want[1]) and torch.equal(x_s.view(-1), want[2].view(-1))
    assert not buffers.zeros("gemv_norm_count", 1, 1, torch.int32, h.device).any()


def test_linear_norm_replays_in_a_cuda_graph():
    """Decode runs it inside a captured graph: replays on new inputs give the new outputs."""
    from kernels_tl import gemm_dispatch
    from kernels_tl.quantize import rmsnorm_quant_op
    n, k, rank = SHAPES[0]
    norm = (rank, n - rank, 4, 0.9, 1e-5)
    xq, xs, wq, ws, h = operands(1, n, k, seed=5)
    static_x, static_h = xq.clone(), h.clone()
    gemm_dispatch.w4ax_linear_norm(static_x, xs, wq, ws, None, static_h.clone(), norm)  # build, lazy buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, x_out, x_q, x_s = gemm_dispatch.w4ax_linear_norm(static_x, xs, wq, ws, None, static_h, norm)
    for seed in (6, 7):
        fresh_x, _, _, _, fresh_h = operands(1, n, k, seed=seed)
        static_x.copy_(fresh_x)
        static_h.copy_(fresh_h)
        graph.replay()
        h_two = fresh_h.clone()
        want = rmsnorm_quant_op(h_two, rank, n - rank, 1e-5, 4, 0.9,
                                residual=gemm_dispatch.w4ax_linear(fresh_x, xs, wq, ws))
        assert torch.equal(static_h, h_two) and torch.equal(x_q, want[1]) and torch.equal(x_out, want[0])
