"""Reference numerics: the specification every kernel is tested against.

Plain torch, importable without tilelang, runs on CPU and GPU. Each function states exactly what
its kernel computes, including rounding and clamping, so integer results can be compared bit for bit.

Conventions
- int4 values are symmetric two's-complement in [-8, 7]; int8 in [-128, 127].
- Rounding is round-half-to-even (torch.round, CUDA rintf), division is IEEE float32 (div.rn).
- Activation scales are float32, one per token (row). Weight scales are float16, one per output row
  (group_size = -1) or one per (row, group).
- int4 packing ("K-major, 8-interleaved"): along the last (reduction) dimension K, every 8 values
  e0..e7 occupy one little-endian 32-bit word of 4 bytes; byte j holds e_j in its low nibble and
  e_{j+4} in its high nibble. A GEMM kernel then gets e0..e3 as int8x4 with
  `(w << 4) & 0xF0F0F0F0` and e4..e7 with `w & 0xF0F0F0F0`: two logic ops per 4 values, each value
  landing as 16*e in int8, in natural K order (the 16 or 256 is folded into the epilogue scale).
"""

from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127


def qrange(bits: int) -> tuple[int, int]:
    if bits == 4:
        return INT4_MIN, INT4_MAX
    if bits == 8:
        return INT8_MIN, INT8_MAX
    raise ValueError(f"unsupported bit width {bits} (4 or 8)")


# ---------------------------------------------------------------- activations

def act_scale(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Per-token symmetric scale: clip * max|x| / qmax, float32, shape x.shape[:-1] + (1,).

    A row of zeros gets scale 1 so that it quantizes to zeros instead of NaN.
    """
    qmax = qrange(bits)[1]
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = amax * clip / qmax
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_act(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization: q = clamp(round(x / s), qmin, qmax) as int8, s float32."""
    qmin, qmax = qrange(bits)
    scale = act_scale(x, bits, clip)
    q = torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8)
    return q, scale


def fake_quant_act(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """quantize_act then dequantize, in float32 (what the model's numerics see)."""
    if bits >= 16:
        return x.float()
    q, s = quantize_act(x, bits, clip)
    return q.float() * s


# ---------------------------------------------------------------- weights

def weight_scale(w: torch.Tensor, bits: int = 4, group_size: int = -1,
                 clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Symmetric per-row (or per-(row, group)) scale: clip * max|w| / qmax, as float16.

    Returned shape: [N, 1] for group_size -1, else [N, K // group_size]. `clip` may be a tensor of
    that shape (the GPTQ MSE clip search picks one per row/group).
    """
    qmax = qrange(bits)[1]
    wg = _grouped(w.float(), group_size)
    amax = wg.abs().amax(dim=-1)
    scale = (amax * clip / qmax).to(torch.float16)
    # fp16 rounding could make a tiny scale 0; keep it positive so quantization never divides by 0.
    return torch.where(scale == 0, torch.full_like(scale, 1e-4), scale)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """q = clamp(round(w / scale), qmin, qmax) as int8; scale from weight_scale (its group layout)."""
    qmin, qmax = qrange(bits)
    n, k = w.shape
    groups = scale.shape[-1]
    wg = w.float().reshape(n, groups, k // groups)
    q = torch.clamp(torch.round(wg / scale.float().unsqueeze(-1)), qmin, qmax)
    return q.reshape(n, k).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[-1]
    return (q.float().reshape(n, groups, k // groups) * scale.float().unsqueeze(-1)).reshape(n, k)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if group_size in (-1, k):
        return w.reshape(n, 1, k)
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    return w.reshape(n, k // group_size, group_size)


# ---------------------------------------------------------------- int4 packing

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim K (multiple of 8) -> uint8 [..., K // 2] (see module doc)."""
    if q.shape[-1] % 8:
        raise ValueError(f"int4 packing needs the last dimension to be a multiple of 8, got {q.shape[-1]}")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 8, 2, 4)
    packed = nib[..., 0, :] | (nib[..., 1, :] << 4)
    return packed.reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K // 2] -> int8 [..., K] in [-8, 7]."""
    words = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 4, 4).to(torch.int16)
    lo = words & 0xF
    hi = (words >> 4) & 0xF
    nib = torch.stack((lo, hi), dim=-2)  # [..., K/8, 2, 4]
    signed = torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------- GEMM

def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulator of a @ b.T for int8 tensors a [M, K], b [N, K].

    The kernels' integer part is compared against this bit for bit. float64 holds every partial sum
    exactly (|sum| < 2^53), so it is exact on any device.
    """
    return (a.double() @ b.double().T).to(torch.int32)


def quant_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 x_out: torch.Tensor | None = None, w_out: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W4A4 / W4A8 GEMM with the fused fp16 outlier path, in float32.

    y = (x_q @ w_q.T) * x_scale * w_scale.T  [+ x_out @ w_out.T]  [+ bias]

    With grouped weight scales the integer products are accumulated per group and scaled per group.
    Integer partial sums are computed in float32 on integer-valued inputs, which is exact while
    |sum| < 2^24 (every int4 x int4 shape we serve; int8 x int4 up to K = 16k).
    """
    groups = w_scale.shape[-1]
    n, k = w_q.shape
    if groups == 1:
        y = (x_q.float() @ w_q.float().T) * w_scale.float().T
    else:
        gs = k // groups
        xg = x_q.float().reshape(-1, groups, gs).transpose(0, 1)          # [G, M, gs]
        wg = w_q.float().reshape(n, groups, gs).permute(1, 2, 0)          # [G, gs, N]
        y = torch.einsum("gmn,gn->mn", torch.bmm(xg, wg), w_scale.float().T)
    y = y * x_scale.float().reshape(-1, 1)
    if x_out is not None and w_out is not None:
        y = y + x_out.float() @ w_out.float().T
    if bias is not None:
        y = y + bias.float()
    return y


# ---------------------------------------------------------------- norm + quantize

def rmsnorm_widened(h: torch.Tensor, d: int, eps: float) -> torch.Tensor:
    """Weightless RMSNorm of the (r + d)-wide residual in float32: sum of squares over all
    channels divided by d (the widened stream carries the original stream's norm, QQᵀ = I)."""
    hf = h.float()
    return hf * torch.rsqrt(hf.pow(2).sum(-1, keepdim=True) / d + eps)


def rmsnorm_split_quant(h: torch.Tensor, r: int, d: int, eps: float, bits: int, clip: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weightless RMSNorm of the (r + d)-wide residual, split into the fp16 outlier part and the
    quantized part.

    The sum of squares runs over all r + d channels and is divided by d: the widened stream carries
    the same norm as the original d-wide one (QQᵀ = I), so the original eps keeps its meaning.
    Returns (x_out [.., r] float32, x_q [.., d] int8, x_scale [.., 1] float32).
    """
    normed = rmsnorm_widened(h, d, eps)
    x_out, x_main = normed[..., :r], normed[..., r:]
    x_q, x_scale = quantize_act(x_main, bits, clip)
    return x_out, x_q, x_scale


# ---------------------------------------------------------------- KV cache

def quantize_kv(x: torch.Tensor, bits: int = 4, clip: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-(token, head) quantization over head_dim (last dim), after the Hadamard.

    scale = clip * (max - min) / (2^bits - 1); zero = round(-clip * min / scale);
    q = clamp(round(x / scale) + zero, 0, 2^bits - 1) as uint8. scale and zero are float32 [..., 1].
    A constant row gets scale 1.
    """
    qmax = 2 ** bits - 1
    xf = x.float()
    xmin = xf.amin(-1, keepdim=True).clamp(max=0) * clip
    xmax = xf.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = (xmax - xmin) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quant_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    if bits >= 16:
        return x.float()
    return dequantize_kv(*quantize_kv(x, bits, clip))
