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


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor as an IEEE float32 division. (On CUDA, torch turns a division by a Python
    scalar into a multiplication by its reciprocal, which rounds differently; a 0-dim tensor on
    x's device keeps the true division the kernels do.)"""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


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
    scale = _div(amax * clip, qmax)
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


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows of a table (embedding, lm_head): q = round(w / s), s = max|row| / 127 (float32
    [N]; 1 for an all-zero row)."""
    scale = w.float().abs().amax(-1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale


def head_w8a8(x_out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, head_out: torch.Tensor,
              head_q: torch.Tensor, head_s: torch.Tensor) -> torch.Tensor:
    """float32 logits through an lm_head kept as the layers' GEMMs keep their weights, from the final
    norm's split (rmsnorm_split_quant at 8 bits, clip 1; x_out [.., r] float16, x_q int8 [.., d],
    x_scale [.., 1]): x_out · head_outᵀ over the r outlier channels (float16 weights) plus
    (x_q · head_qᵀ) · sx · head_s over the d others. The integer products are summed in float64,
    exactly."""
    ints = (x_q.double() @ head_q.double().T).float()
    return x_out.float() @ head_out.float().T + ints * x_scale * head_s


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


def swiglu_f16(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the MLP's gate_up [.., 2n] (gate first) in float16 arithmetic, as torch's
    float16 kernels compute it: silu(g) = g / (1 + exp(-g)) in float32 rounded to float16, then the
    product rounded to float16 (what `quantize.hadamard_quant(gated=True)` computes on load)."""
    gate, up = gate_up.half().chunk(2, dim=-1)
    g = gate.float()
    return ((g / (1 + torch.exp(-g))).half().float() * up.float()).half()


# ---------------------------------------------------------------- KV cache

def quantize_kv(x: torch.Tensor, bits: int = 4, clip: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-(token, head) quantization over head_dim (last dim), after the Hadamard.

    scale = fp16(clip * (max - min) / (2^bits - 1)) (the cache stores it in float16, so the values
    are quantized with the stored scale); zero = clamp(round(-clip * min / scale), 0, 2^bits - 1);
    q = clamp(round(x / scale) + zero, 0, 2^bits - 1) as uint8. scale and zero are float32 [..., 1]
    holding float16-exact values. A constant row gets scale 1.
    """
    qmax = 2 ** bits - 1
    xf = x.float()
    xmin = xf.amin(-1, keepdim=True).clamp(max=0) * clip
    xmax = xf.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = _div(xmax - xmin, qmax).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-xmin / scale), 0, qmax)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quant_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    if bits >= 16:
        return x.float()
    return dequantize_kv(*quantize_kv(x, bits, clip))


# ---------------------------------------------------------------- paged int4 KV cache
#
# Per layer: data uint8 [num_blocks, kv_heads, block_size, head_dim / 2] and meta float16
# [num_blocks, kv_heads, block_size, 2] = (scale, zero) of each (token, head). Byte j of a token's
# row holds element 2j in its low nibble and 2j + 1 in its high nibble. A token at position p of a
# sequence lives in slot = block_table[p // block_size] * block_size + p % block_size.
# docs/kv-cache-format.md describes the same layout.

def pack_kv(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], last dim even -> uint8 [..., d / 2], low nibble first."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_kv(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def kv_store(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_data: torch.Tensor,
             k_meta: torch.Tensor, v_data: torch.Tensor, v_meta: torch.Tensor, clip: float = 1.0) -> None:
    """Quantize the new tokens' K and V [T, kv_heads, head_dim] and write them to their slots (in
    place). Slot -1 is skipped (padding of a CUDA-graph batch)."""
    block_size = k_data.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    for x, data, meta in ((k[keep], k_data, k_meta), (v[keep], v_data, v_meta)):
        q, scale, zero = quantize_kv(x, 4, clip)
        data[blocks, :, offsets] = pack_kv(q)
        meta[blocks, :, offsets] = torch.cat((scale, zero), dim=-1).half()


def gather_kv(data: torch.Tensor, meta: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, dequantized: float32 [length, kv_heads, head_dim]."""
    block_size = data.shape[2]
    blocks = block_table[: -(-length // block_size)].long()
    q = unpack_kv(data[blocks]).transpose(1, 2).flatten(0, 1)[:length]        # [T, H, D]
    m = meta[blocks].transpose(1, 2).flatten(0, 1)[:length].float()            # [T, H, 2]
    return (q.float() - m[..., 1:]) * m[..., :1]


def paged_attention(q: torch.Tensor, k_data: torch.Tensor, k_meta: torch.Tensor, v_data: torch.Tensor,
                    v_meta: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_lens: torch.Tensor | None = None, sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of packed queries over the paged int4 cache, float32 softmax.

    q [sum(query_lens), heads, head_dim] holds each sequence's last query_lens[i] tokens (1 each for
    decode, the default); sequence i attends to its first context_lens[i] cached tokens, causally.
    Returns float32 [sum(query_lens), heads, head_dim]."""
    return _paged_attend(q, lambda table, n: gather_kv(k_data, k_meta, table, n),
                         lambda table, n: gather_kv(v_data, v_meta, table, n),
                         block_tables, context_lens, query_lens, sm_scale)


# The float16 paged cache of the unquantized baseline: [num_blocks, kv_heads, block_size, head_dim].

def kv_store_fp16(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> None:
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, :, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, :, slots % block_size] = v[keep].to(v_cache.dtype)


def gather_fp16(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    blocks = block_table[: -(-length // cache.shape[2])].long()
    return cache[blocks].transpose(1, 2).flatten(0, 1)[:length].float()


def paged_attention_fp16(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, query_lens: torch.Tensor | None = None,
                         sm_scale: float | None = None) -> torch.Tensor:
    return _paged_attend(q, lambda table, n: gather_fp16(k_cache, table, n),
                         lambda table, n: gather_fp16(v_cache, table, n),
                         block_tables, context_lens, query_lens, sm_scale)


def _paged_attend(q, gather_k, gather_v, block_tables, context_lens, query_lens, sm_scale) -> torch.Tensor:
    batch = context_lens.shape[0]
    query_lens = torch.ones(batch, dtype=torch.long) if query_lens is None else query_lens
    heads, dim = q.shape[1], q.shape[2]
    sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
    out, start = [], 0
    for i in range(batch):
        n, ctx = int(query_lens[i]), int(context_lens[i])
        k, v = gather_k(block_tables[i], ctx), gather_v(block_tables[i], ctx)
        group = heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # [ctx, heads, D]
        qi = q[start:start + n].float()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * sm_scale
        pos_q = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(ctx, device=q.device).unsqueeze(0) > pos_q, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += n
    return torch.cat(out)
