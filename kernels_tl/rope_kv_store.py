"""RoPE + head-dim Hadamard on Q and K, fused with the paged int4 KV store (TileLang, Hopper).

What: one kernel per layer reads the qkv GEMM's float16 output [T, (heads + 2·kv_heads)·head_dim]
and writes
- Q, rotated: hadamard(apply_rope(q)) as float16 [T, heads, head_dim], the attention's query;
- K, rotated the same way, rounded to float16, then quantized to int4 into its cache slot;
- V (no RoPE, no Hadamard: V's Hadamard is fused into v_proj offline) quantized into its slot;
- with round_trip, K and V as the cache now holds them, dequantized to float16 (every token),
  for a prefill that attends to its own tokens (as `kv_store`'s round_trip).

Why: the engine's step ran RoPE + the head Hadamard of Q and K as one cuBLAS batched matmul with
per-token float16 [hd, hd] matrices, which wrote a [T, heads + kv_heads, hd] intermediate that
`kv_store` then read back. Fusing saves that launch and the intermediate's round trip through
memory, per layer; it reads per-token cos / sin rows (2·hd floats) instead of an hd x hd matrix
per token. Its numerics (the exact rotation rounded once) are now the reference's too
(`models.llama.Attention.forward`'s elementwise path).

Numerics (`rope_kv_store_reference` is the specification):
- y = x·cos + rotate_half(x)·sin in float32 from the float16 inputs, rotate_half(x) = cat(-x2, x1)
  (HF's rotate-half RoPE, `models.llama.apply_rope`), cos / sin float32 [T, hd] (`rope_cos_sin`);
- then the orthonormal Walsh-Hadamard of order hd (Sylvester, = `apply_hadamard(y, [hd])`) in
  float32 as a butterfly, scaled by 1/sqrt(hd) at the end; only the float32 summation order
  differs from the reference (relative error ~1e-7 before the float16 rounding, which makes Q
  and K within a float16 rounding boundary of the reference, not bit-equal);
- rounded to float16; K is then quantized exactly as `kv_store` quantizes a float16 K: the cache
  holds `reference.kv_store` of the kernel's own float16 K, bit for bit, and V's codes equal
  `reference.kv_store` of the input V bit for bit.
hadamard=False: RoPE only; its products and sum are rounded separately (no FMA), as torch
computes them, so Q and K then equal the reference bit for bit.

Layout: one warp per row of TOKENS_PER_WARP consecutive tokens (all their loads issued before
the first token's work), 4 rows a block (ROWS_PER_BLOCK); rows = heads Q rows, then
kv_heads K rows, then kv_heads V rows, the qkv GEMM's column order, so row r of a token is
QKV[tok, r·hd : (r + 1)·hd]. Lane l holds elements [l·hd/32, (l + 1)·hd/32) (hd/32 = 2 or 4
consecutive: one 4- or 8-byte load): the Hadamard's low index bits are inside a lane's
registers, its 5 high bits are the lane index, so those stages are XOR warp shuffles; the
rotate-half partner of element j is j ± hd/2, the same register of lane l ^ 16. No shared memory,
no block barrier. Cache layout: `kv_attention.py`'s docstring and `reference.kv_store`.
Slot -1 (padding of a CUDA-graph batch): Q is written, the cache is not; round_trip outputs are
written for every token.
"""

import functools
import math
import os

import tilelang
import tilelang.language as T
import torch

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard, hadamard_factors
from kernels_tl.hadamard_rows import _register_butterfly
from kernels_tl.kv_attention import BLOCK_SIZE
from kernels_tl.kv_store import quantize_store_row
from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# Warps (rows) per block. A block of one warp, as kv_store uses, caps an SM at 32 resident warps
# (Hopper's limit of 32 blocks per SM); each warp here is a chain of dependent loads, shuffles and
# stores, so at prefill sizes the warps in flight set the throughput: 4 warps a block allow the
# SM's 64 (ptxas: at most 32 registers a thread, so the register file holds them). Not measured
# yet. At decode sizes the grid is smaller than the GPU either way. The rows of a block are
# independent (no shared memory, no barrier); the last block's spare warps idle (SmolLM2: 15 rows).
ROWS_PER_BLOCK = 4
# Tokens a warp handles (its rows of that many consecutive tokens): one token a warp left each
# warp a single dependent chain (load, shuffles, stores) and the grid ~100k short-lived warps; a
# 2048-token prefill's store ran at ~40% of copy bandwidth (32 µs a layer on the H200).
TOKENS_PER_WARP = int(os.environ.get("QUAD_ROPE_TOKENS_PER_WARP", "2"))


@functools.lru_cache(maxsize=None)
def rope_kv_store(heads: int, kv_heads: int, head_dim: int, block_size: int = BLOCK_SIZE, clip: float = 1.0,
                  hadamard: bool = True, target=None, round_trip: bool = False, tokens_per_warp: int | None = None):
    """Build the fused RoPE + head Hadamard + int4 KV store; called as
    kernel(qkv, cos, sin, slot_mapping, k_data, k_meta, v_data, v_meta, q_out[, k_out, v_out]).

    qkv float16 [T, (heads + 2·kv_heads)·head_dim], cos / sin float32 [T, head_dim], slot_mapping
    int32 [T] (-1: no cache write), the layer's cache (k_data uint8 [nb, kv_heads, block_size,
    head_dim / 2], k_meta float16 [nb, kv_heads, block_size, 2], v_data / v_meta likewise), q_out
    float16 [T, heads, head_dim]; with round_trip k_out, v_out float16 [T, kv_heads, head_dim]."""
    if head_dim not in (64, 128):
        # hd / 32 consecutive elements a lane, an even number of them (whole bytes of nibbles).
        raise ValueError(f"head_dim {head_dim}: the fused RoPE + KV store supports 64 and 128")
    per_lane = head_dim // 32
    half = head_dim // 2
    rows = heads + 2 * kv_heads
    width = rows * head_dim
    reg_bits = per_lane.bit_length() - 1       # Hadamard stages inside a lane's registers
    norm = 1.0 / math.sqrt(head_dim)
    blocks_y = -(-rows // ROWS_PER_BLOCK)
    tpw = tokens_per_warp or TOKENS_PER_WARP

    store_row = quantize_store_row(per_lane, block_size, clip, round_trip)

    @tilelang.jit(target=TARGETS[target])
    def build():
        t = T.dynamic("tokens")
        nb = T.dynamic("num_blocks")

        @T.macro
        def load(QKV, COS, SIN, SLOTS, tok, row, lane, u, slots, xh, cs, sn):
            """Token tok's inputs of this row into the registers of slot u: its cache slot, the row's
            float16 values and, for Q and K, its cos / sin."""
            slots[u] = SLOTS[tok]
            # A padding token's K / V row is dead work unless round_trip hands it back.
            if row < heads or round_trip or slots[u] >= 0:
                for i in T.vectorized(per_lane):
                    xh[u, i] = QKV[tok, row * head_dim + lane * per_lane + i]
                if row < heads + kv_heads:
                    for i in T.vectorized(per_lane):
                        cs[u, i] = COS[tok, lane * per_lane + i]
                    for i in T.vectorized(per_lane):
                        sn[u, i] = SIN[tok, lane * per_lane + i]

        @T.macro
        def body(KD, KM, VD, VM, QO, KO, VO, tok, row, lane, u, slots, xh, cs, sn):
            x = T.alloc_local((per_lane,), "float32")
            y = T.alloc_local((per_lane,), "float32")   # the register butterfly's ping-pong buffer
            stat = T.alloc_local((4,), "float32")  # lo, hi, scale, zero
            slot = slots[u]
            is_q = row < heads
            is_k = row >= heads and row < heads + kv_heads
            h = T.if_then_else(is_k, row - heads, row - heads - kv_heads)  # K / V head
            if is_q or round_trip or slot >= 0:
                for i in T.unroll(per_lane):
                    x[i] = T.Cast("float32", xh[u, i])
                if row < heads + kv_heads:  # Q or K: RoPE, then the head Hadamard
                    # rotate_half: element j < hd/2 takes -x[j + hd/2], j >= hd/2 takes x[j - hd/2],
                    # both the same register of lane ^ 16. Products and sum rounded separately
                    # (no FMA), as torch computes x·cos + r·sin.
                    for i in T.unroll(per_lane):
                        p = T.shfl_xor(x[i], 16)
                        r = T.if_then_else(lane < 16, -p, p)
                        x[i] = T.call_extern("float32", "__fadd_rn", T.call_extern("float32", "__fmul_rn", x[i], cs[u, i]),
                                             T.call_extern("float32", "__fmul_rn", r, sn[u, i]))
                    if hadamard:
                        # Index bits below reg_bits: registers (result in x after an even number of
                        # stages, in y after an odd one).
                        _register_butterfly(x, y, 0, per_lane, 0, reg_bits)
                        if reg_bits % 2 == 1:
                            for i in T.unroll(per_lane):
                                x[i] = y[i]
                        # The lane bits: the lane without bit m holds a, its partner b; a + b stays
                        # with the first, a - b with the second.
                        for m in list(range(5)):
                            for i in T.unroll(per_lane):
                                p = T.shfl_xor(x[i], 1 << m)
                                x[i] = T.if_then_else(lane & (1 << m) == 0, x[i] + p, p - x[i])
                        for i in T.unroll(per_lane):
                            x[i] = x[i] * T.float32(norm)
                    for i in T.unroll(per_lane):
                        xh[u, i] = T.Cast("float16", x[i])
                    if is_q:
                        for i in T.vectorized(per_lane):
                            QO[tok, row, lane * per_lane + i] = xh[u, i]
                    else:  # the cache quantizes the float16 K
                        for i in T.unroll(per_lane):
                            x[i] = T.Cast("float32", xh[u, i])
                if not is_q:  # kv_store's quantization and store, the same macro
                    store_row(x, stat, slot, slot // block_size, slot % block_size, is_k, h, tok, lane,
                              KD, KM, VD, VM, KO, VO)

        @T.macro
        def launch(QKV, COS, SIN, SLOTS, KD, KM, VD, VM, QO, KO, VO):
            with T.Kernel(T.ceildiv(t, tpw), blocks_y, threads=32 * ROWS_PER_BLOCK) as (bt, by):
                wait_for_producers("kv_store")
                tx = T.get_thread_binding()
                row = by * ROWS_PER_BLOCK + tx // 32
                slots = T.alloc_local((tpw,), "int32")
                xh = T.alloc_local((tpw, per_lane), "float16")
                cs = T.alloc_local((tpw, per_lane), "float32")
                sn = T.alloc_local((tpw, per_lane), "float32")
                if rows % ROWS_PER_BLOCK == 0 or row < rows:  # warp-uniform: no shuffle is split
                    # Every token's loads first, then the work and stores: the loads are in flight
                    # together (the stores may alias them as far as the compiler knows, so loads
                    # after a store would wait for it).
                    for u in T.unroll(tpw):
                        if bt * tpw + u < t:
                            load(QKV, COS, SIN, SLOTS, bt * tpw + u, row, tx % 32, u, slots, xh, cs, sn)
                    for u in T.unroll(tpw):
                        if bt * tpw + u < t:
                            body(KD, KM, VD, VM, QO, KO, VO, bt * tpw + u, row, tx % 32, u, slots, xh, cs, sn)

        if round_trip:
            @T.prim_func
            def main(QKV: T.Tensor((t, width), "float16"), COS: T.Tensor((t, head_dim), "float32"),
                     SIN: T.Tensor((t, head_dim), "float32"), SLOTS: T.Tensor((t,), "int32"),
                     KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     VM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     QO: T.Tensor((t, heads, head_dim), "float16"),
                     KO: T.Tensor((t, kv_heads, head_dim), "float16"),
                     VO: T.Tensor((t, kv_heads, head_dim), "float16")):
                launch(QKV, COS, SIN, SLOTS, KD, KM, VD, VM, QO, KO, VO)
        else:
            @T.prim_func
            def main(QKV: T.Tensor((t, width), "float16"), COS: T.Tensor((t, head_dim), "float32"),
                     SIN: T.Tensor((t, head_dim), "float32"), SLOTS: T.Tensor((t,), "int32"),
                     KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     VM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     QO: T.Tensor((t, heads, head_dim), "float16")):
                launch(QKV, COS, SIN, SLOTS, KD, KM, VD, VM, QO, QO, QO)  # KO, VO: never written here

        return main

    return build()


def rope_kv_store_op(qkv, cos, sin, slot_mapping, k_data, k_meta, v_data, v_meta, heads: int, kv_heads: int,
                     head_dim: int, clip: float = 1.0, hadamard: bool = True, round_trip: bool = False):
    """Rotate Q, store K and V into the paged cache (in place), for the qkv GEMM's output [T, (heads +
    2·kv_heads)·head_dim] (any leading shape with T rows) and cos / sin [T, head_dim] (likewise).
    Returns q_rot float16 [T, heads, head_dim]; with round_trip (q_rot, k_out, v_out), k_out and
    v_out float16 [T, kv_heads, head_dim] as the cache holds them (see `kv_store`)."""
    width = (heads + 2 * kv_heads) * head_dim
    kernel = rope_kv_store(heads, kv_heads, head_dim, k_data.shape[2], float(clip), bool(hadamard),
                           round_trip=round_trip)
    qkv = qkv.reshape(-1, width).half().contiguous()
    tokens = qkv.shape[0]
    q_rot = torch.empty(tokens, heads, head_dim, dtype=torch.float16, device=qkv.device)
    args = (qkv, cos.reshape(-1, head_dim).float().contiguous(), sin.reshape(-1, head_dim).float().contiguous(),
            slot_mapping.reshape(-1).int().contiguous(), k_data, k_meta, v_data, v_meta, q_rot)
    if not round_trip:
        kernel(*args)
        return q_rot
    k_out = torch.empty(tokens, kv_heads, head_dim, dtype=torch.float16, device=qkv.device)
    v_out = torch.empty_like(k_out)
    kernel(*args, k_out, v_out)
    return q_rot, k_out, v_out


def rope_hadamard_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hadamard: bool = True
                            ) -> torch.Tensor:
    """hadamard(apply_rope(x)) in float32, not rounded: x [T, rows, hd] (float16 values), cos / sin
    float32 [T, hd]. The kernel's value before its float16 rounding, up to summation order."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    y = xf * cos.float().unsqueeze(1) + rotated * sin.float().unsqueeze(1)
    return apply_hadamard(y, hadamard_factors(x.shape[-1])) if hadamard else y


def rope_kv_store_reference(qkv, cos, sin, slot_mapping, k_data, k_meta, v_data, v_meta, heads: int, kv_heads: int,
                            head_dim: int, clip: float = 1.0, hadamard: bool = True, round_trip: bool = False):
    """The specification of `rope_kv_store_op` (same arguments and results), plain torch, CPU or GPU:
    Q and K rotated in float32 (`rope_hadamard_reference`) and rounded to float16; the cache gets
    `reference.kv_store` of that float16 K and of the float16 V; round_trip returns K and V
    dequantized from their codes (`reference.fake_quant_kv`) rounded to float16, every token."""
    x = qkv.reshape(-1, heads + 2 * kv_heads, head_dim).half()   # the GEMM's float16 output
    cos, sin = cos.reshape(-1, head_dim), sin.reshape(-1, head_dim)
    qk = rope_hadamard_reference(x[:, :heads + kv_heads], cos, sin, hadamard).half()
    q_rot, k = qk[:, :heads], qk[:, heads:].float()
    v = x[:, heads + kv_heads:].float()
    ref.kv_store(k, v, slot_mapping.reshape(-1), k_data, k_meta, v_data, v_meta, clip=clip)
    if not round_trip:
        return q_rot.contiguous()
    return (q_rot.contiguous(), ref.fake_quant_kv(k, 4, clip).half(), ref.fake_quant_kv(v, 4, clip).half())
