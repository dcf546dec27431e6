"""The reference numerics: quantizers, int4 packing, the quantized GEMM."""

import pytest
import torch

from kernels_tl import reference as ref


def test_pack_unpack_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (37, 4, 96), generator=g, dtype=torch.int8)
    packed = ref.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 4, 48)
    assert torch.equal(ref.unpack_int4(packed), q)


def test_pack_layout_matches_the_documented_word_order():
    # e0..e7 of one 8-group: byte j = e_j (low nibble) | e_{j+4} (high nibble).
    q = torch.tensor([[1, 2, 3, 4, -1, -2, -3, -8]], dtype=torch.int8)
    packed = ref.pack_int4(q)
    assert packed.tolist() == [[0xF1, 0xE2, 0xD3, 0x84]]
    # The kernel's unpack trick: (w << 4) & 0xF0F0F0F0 gives 16*e0..e3, w & 0xF0F0F0F0 gives 16*e4..e7.
    word = int.from_bytes(bytes(packed[0].tolist()), "little")
    lo = ((word << 4) & 0xF0F0F0F0).to_bytes(5, "little")[:4]
    hi = (word & 0xF0F0F0F0).to_bytes(4, "little")
    as_int8 = lambda bs: [b - 256 if b >= 128 else b for b in bs]
    assert as_int8(lo) == [16 * v for v in (1, 2, 3, 4)]
    assert as_int8(hi) == [16 * v for v in (-1, -2, -3, -8)]


def test_pack_rejects_k_not_multiple_of_8():
    with pytest.raises(ValueError):
        ref.pack_int4(torch.zeros(2, 12, dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantization_range_and_error(bits):
    x = torch.randn(64, 256) * torch.rand(64, 1) * 10
    q, s = ref.quantize_act(x, bits, clip=1.0)
    qmin, qmax = ref.qrange(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert s.shape == (64, 1) and s.dtype == torch.float32
    # Without clipping, the error of each value is at most half a step.
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()
    # The absmax value lands exactly on qmax.
    assert (q.abs().amax(-1) == qmax).all()


def test_activation_clip_saturates_the_largest_values():
    x = torch.randn(8, 128)
    q, _ = ref.quantize_act(x, 4, clip=0.5)
    assert (q == 7).any() or (q == -8).any()


def test_zero_row_quantizes_to_zero():
    q, s = ref.quantize_act(torch.zeros(2, 16), 4, 0.9)
    assert torch.equal(q, torch.zeros_like(q)) and torch.isfinite(s).all()


@pytest.mark.parametrize("group_size", [-1, 32])
def test_weight_quantization_and_quant_linear_match_float_math(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    scale = ref.weight_scale(w, 4, group_size)
    assert scale.dtype == torch.float16
    assert scale.shape == ((48, 1) if group_size == -1 else (48, 128 // group_size))
    wq = ref.quantize_weight(w, scale)
    assert int(wq.min()) >= -8 and int(wq.max()) <= 7
    x = torch.randn(5, 128, generator=g)
    xq, xs = ref.quantize_act(x, 4, 0.9)
    x_out, w_out, bias = torch.randn(5, 8, generator=g), torch.randn(48, 8, generator=g), torch.randn(48, generator=g)
    y = ref.quant_linear(xq, xs, wq, scale, x_out, w_out, bias)
    expected = (xq.double() * xs.double()) @ ref.dequantize_weight(wq, scale).double().T \
        + x_out.double() @ w_out.double().T + bias.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_int_matmul_is_exact_for_large_k():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (3, 20000), generator=g, dtype=torch.int8)
    b = torch.randint(-8, 8, (4, 20000), generator=g, dtype=torch.int8)
    exact = (a.long() @ b.long().T)
    assert torch.equal(ref.int_matmul(a, b).long(), exact)


def test_kv_quantization_is_asymmetric_per_token_and_head():
    x = torch.randn(2, 3, 10, 64) + 3.0  # an offset that symmetric quantization would waste range on
    q, s, z = ref.quantize_kv(x, 4)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (2, 3, 10, 1)
    err = (ref.dequantize_kv(q, s, z) - x).abs()
    assert (err <= s * 0.5 + 1e-5).all()


def test_rmsnorm_split_uses_the_original_width_for_the_mean():
    r, d = 4, 12
    h = torch.randn(3, r + d)
    x_out, x_q, x_s = ref.rmsnorm_split_quant(h, r, d, 1e-6, 8, 1.0)
    rms = (h.pow(2).sum(-1, keepdim=True) / d).sqrt()
    assert torch.allclose(x_out, h[:, :r] / rms, atol=1e-6)
    assert torch.allclose(x_q.float() * x_s, h[:, r:] / rms, atol=float(x_s.max()))


def test_swiglu_f16_is_torchs_float16_silu_times_up():
    torch.manual_seed(0)
    gate_up = (torch.randn(64, 2 * 96) * 4).half()
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up   # float16 ops on the CPU: float32 inside, rounded
    got = ref.swiglu_f16(gate_up)
    assert got.dtype == torch.float16
    # CPU and CUDA exp may differ in the last float32 bit, so a rounding of silu may land one
    # float16 step apart; the GPU test checks equality with the CUDA kernels.
    assert ((got.float() - want.float()).abs() <= 2e-3 * want.float().abs() + 1e-6).all()
