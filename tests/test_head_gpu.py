"""The int8 lm_head's decode kernels (kernels_tl.head_gemv, through ops.head_w8a8 for M <= 4; the
int8-weight decode GEMM for 5-64 tokens) against reference.head_w8a8 on the GPU, and the final
norm + head (ops.head_logits_int8) against the reference backend: fresh inputs, poisoned (NaN)
outputs.

The integer part is exact and its scales are applied in the reference's order with IEEE products,
so only the outlier sum's float32 order differs: the logits are required within 1e-5 of max|ref|
(absolute), and bit-equal to the reference when the outlier weights are zero."""

import pytest
import torch

from kernels_tl import reference as ref

pytestmark = pytest.mark.gpu

# (vocab, d, r): Llama-3-8B, SmolLM2, Qwen2.5-7B heads; a vocabulary the 16 rows per block do not
# divide, with r not a multiple of 32; no outlier channels.
SHAPES = [(128256, 4096, 64), (49152, 576, 64), (151936, 3584, 64), (1000, 512, 8), (1024, 512, 0)]
MS = [1, 2, 3, 4]
TOL = 1e-5  # max |logits - ref| <= TOL * max |ref|


@pytest.fixture(scope="module", autouse=True)
def built():
    """Every kernel these tests run, compiled in parallel up front."""
    from kernels_tl import gemm_dispatch
    from kernels_tl.head_gemv import prebuild
    prebuild(SHAPES)
    gemm_dispatch.prebuild_w8a8([(m, n, d, r) for n, d, r in SHAPES[:2] + SHAPES[4:] for m in (5, 17, 40, 64)
                                 if gemm_dispatch.w8a8_decode_supports(n, d, r)])


def split(hidden, r):
    """The final norm's split of a normalized hidden: (x_out float16, x_q int8, x_scale), as
    ops.head_logits_int8 hands it to the head."""
    return (hidden[..., :r].half(), *ref.quantize_act(hidden[..., r:], 8, 1.0))


def operands(m, n, d, r, seed, zero_outlier_weights=False):
    """The head's input split from a widened hidden (float32, outlier channels larger) and an int8
    head quantized from a random float table, as QuadForCausalLM.use_int8_head builds it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(m, r + d, generator=g, device="cuda")
    hidden[:, :r] *= 8
    head_q, head_s = ref.quantize_rows_int8(torch.randn(n, d, generator=g, device="cuda") * 0.02)
    head_out = (torch.randn(n, r, generator=g, device="cuda") * 0.02).half()
    if zero_outlier_weights:
        head_out.zero_()
    return split(hidden, r), head_out, head_q, head_s


def poisoned(m, n):
    return torch.full((m, n), float("nan"), device="cuda")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,d,r", SHAPES)
def test_matches_reference(m, n, d, r):
    from kernels_tl.head_gemv import head_w8a8_op
    x, head_out, head_q, head_s = operands(m, n, d, r, seed=m * 31 + n + r)
    assert head_s.dtype == torch.float32 and head_q.dtype == torch.int8
    y = poisoned(m, n)
    head_w8a8_op(*x, head_out, head_q, head_s, out=y)
    expected = ref.head_w8a8(*x, head_out, head_q, head_s)
    assert not torch.isnan(y).any()
    err = float((y - expected).abs().max())
    assert err <= TOL * float(expected.abs().max()), (err, float(expected.abs().max()))


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,d,r", SHAPES[:1] + SHAPES[3:4])
def test_zero_outlier_weights_give_the_reference_bit_for_bit(m, n, d, r):
    """With head_out = 0 the outlier path still runs but adds zeros: the logits are the reference's
    float32(ints) * sx * head_s exactly (same integer sum, same products in the same order)."""
    from kernels_tl.head_gemv import head_w8a8_op
    x, head_out, head_q, head_s = operands(m, n, d, r, seed=m + 5, zero_outlier_weights=True)
    y = poisoned(m, n)
    head_w8a8_op(*x, head_out, head_q, head_s, out=y)
    assert torch.equal(y, ref.head_w8a8(*x, head_out, head_q, head_s))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,d,r", SHAPES[:2] + SHAPES[3:])
def test_integer_part_is_exact(m, n, d, r):
    """Unit scales and a zero x_out: the output is the int32 dot product itself (rounded once to
    float32, as the reference's float64 sum is), on full-range int8 operands, including the
    largest possible sum (-128 · -127 over all of d)."""
    from kernels_tl.head_gemv import GEMV_TOKENS, head_gemv
    g = torch.Generator(device="cuda").manual_seed(n + d + m)
    xq = torch.randint(-128, 128, (m, d), generator=g, device="cuda", dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, d), generator=g, device="cuda", dtype=torch.int8)
    xq[0], wq[-1] = -128, -127
    x_out = torch.zeros(m, r, device="cuda").half() if r else torch.zeros(1, 1, device="cuda").half()
    w_out = torch.randn(n, r, generator=g, device="cuda").half() if r else torch.zeros(1, 1, device="cuda").half()
    y = poisoned(m, n)
    tokens = next(t for t in GEMV_TOKENS if t >= m)
    head_gemv(n, d, r, tokens)(x_out, xq, torch.ones(m, device="cuda"), wq, torch.ones(n, device="cuda"), w_out, y)
    ints = xq.double() @ wq.double().T  # exact: every partial sum is far below 2^53
    assert torch.equal(y, ints.float())
    assert y[0, -1] == 128 * 127 * d


@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (4,), (1, 3)])
def test_ops_head_runs_the_gemv_on_cuda(lead, monkeypatch):
    """ops.head_w8a8 on CUDA inputs: M <= 4 goes to the GEMV (leading dims kept), and matches the
    reference as above."""
    from kernels_tl import head_gemv
    from quad_engine import ops
    monkeypatch.delenv("QUAD_BACKEND", raising=False)
    calls = []
    op = head_gemv.head_w8a8_op
    monkeypatch.setattr(head_gemv, "head_w8a8_op", lambda *a, **k: calls.append(1) or op(*a, **k))
    n, d, r = SHAPES[1]
    m = 1
    for size in lead:
        m *= size
    x, head_out, head_q, head_s = operands(m, n, d, r, seed=sum(lead))
    x = [t.reshape(*lead, -1) for t in x]
    logits = ops.head_w8a8(*x, head_out, head_q, head_s)
    expected = ref.head_w8a8(*x, head_out, head_q, head_s)
    assert calls and logits.shape == expected.shape == (*lead, n) and logits.dtype == torch.float32
    assert float((logits - expected).abs().max()) <= TOL * float(expected.abs().max())


@pytest.mark.parametrize("m", [5, 17, 40, 64, 65])
@pytest.mark.parametrize("n,d,r", SHAPES[:2] + SHAPES[4:])
def test_ops_head_above_four_tokens(m, n, d, r):
    """5-64 tokens: the decode GEMM on int8 weight rows (int8 wgmma, float16 outlier product fused);
    above 64: torch._int_mm and a float16 GEMM for the outlier product (float16 accumulation order:
    a looser bound). The integer part alone (x_out = 0, unit scales) is exact."""
    from kernels_tl import gemm_dispatch
    from quad_engine import ops
    x, head_out, head_q, head_s = operands(m, n, d, r, seed=9 + m)
    logits = ops.head_w8a8(*x, head_out, head_q, head_s)
    expected = ref.head_w8a8(*x, head_out, head_q, head_s)
    assert logits.shape == expected.shape and not torch.isnan(logits).any()
    assert float((logits - expected).abs().max()) <= 1e-2 * float(expected.abs().max())
    if m <= gemm_dispatch.DECODE_MAX_M and gemm_dispatch.w8a8_decode_supports(n, d, r):
        q = torch.randint(-128, 128, (m, d), device="cuda", dtype=torch.int8)
        y = poisoned(m, n)
        gemm_dispatch.w8a8_decode_linear(q, torch.ones(m, device="cuda"), head_q, torch.ones(n, device="cuda"),
                                         out=y)
        assert torch.equal(y.double(), (q.double() @ head_q.double().T).float().double())


def test_gemv_replays_in_a_cuda_graph():
    """Decode runs the head inside a captured graph: a replay on new inputs gives the new logits."""
    from quad_engine import ops
    n, d, r = SHAPES[0]
    x, head_out, head_q, head_s = operands(1, n, d, r, seed=3)
    static = [t.clone() for t in x]
    ops.head_w8a8(*static, head_out, head_q, head_s)  # warm-up: the build and lazy buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = ops.head_w8a8(*static, head_out, head_q, head_s)
    g = torch.Generator(device="cuda").manual_seed(4)
    for _ in range(2):
        fresh = split(torch.randn(1, r + d, generator=g, device="cuda"), r)
        for buf, value in zip(static, fresh):
            buf.copy_(value)
        graph.replay()
        expected = ref.head_w8a8(*fresh, head_out, head_q, head_s)
        assert float((logits - expected).abs().max()) <= TOL * float(expected.abs().max())


@pytest.mark.parametrize("m", [1, 4, 17, 100])
def test_final_norm_and_head_follow_the_reference(m, monkeypatch):
    """ops.head_logits_int8 (the final norm, the pending residual add and the head's int8
    quantization in one rmsnorm_quant pass, then the head) against the reference backend on the same
    inputs: the norm kernel may round a rare int8 code the other way (its float32 order), so the
    logits are compared in relative L2; the residual is updated in place the same way."""
    from types import SimpleNamespace

    from quad_engine import ops
    n, d, r = SHAPES[1]
    cfg = SimpleNamespace(rank=r, hidden_size=d, rms_norm_eps=1e-5)
    g = torch.Generator(device="cuda").manual_seed(m)
    h = torch.randn(m, r + d, generator=g, device="cuda") * 3
    pending = torch.randn(m, r + d, generator=g, device="cuda").half()
    _, head_out, head_q, head_s = operands(1, n, d, r, seed=m + 77)
    h_kernel, h_ref = h.clone(), h.clone()
    logits = ops.head_logits_int8(h_kernel, pending, cfg, head_out, head_q, head_s)
    monkeypatch.setenv("QUAD_BACKEND", "reference")
    expected = ops.head_logits_int8(h_ref, pending, cfg, head_out, head_q, head_s)
    assert torch.equal(h_kernel, h_ref) and torch.equal(h_ref, h + pending.float())
    assert logits.shape == expected.shape == (m, n) and not torch.isnan(logits).any()
    assert float((logits - expected).norm() / expected.norm()) < 1e-3
