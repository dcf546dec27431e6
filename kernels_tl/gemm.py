"""W4A4 / W4A8 GEMM with the fused fp16 outlier path (TileLang, Hopper).

Computes exactly `reference.quant_linear` for per-row weight scales:

    Y = (Xq · Wqᵀ) · sx · swᵀ  +  X_out · W_outᵀ  (+ bias)

Hopper has no fast int4 tensor-core path, so int4 is only the storage format: each K tile of the
packed operands is unpacked in shared memory to int8 holding 16·q (the two-logic-op nibble trick of
the checkpoint's packing, see docs/checkpoint-format.md) and multiplied on int8 wgmma into an int32
accumulator. The 16 (or 16·16) is folded into the epilogue scale, so the integer part is exact.
The r outlier channels run as a second, fp16 wgmma into a float32 accumulator in the same kernel.
M is dynamic: one compiled kernel serves every token count.
"""


import functools

import tilelang
import tilelang.language as T

# Explicit target so kernels also build (codegen + nvcc) on a machine without a GPU.
SM90 = "sm90"
_TARGETS = {"sm90": {"kind": "cuda", "arch": "sm_90a"}, None: "auto"}


def _nibble_as_int8x16(packed_byte, element):
    """int8 holding 16·q for element `element` of an 8-group: byte element % 4, nibble element // 4."""
    shifted = T.if_then_else(element // 4 == 0, packed_byte << T.uint8(4), packed_byte)
    return T.reinterpret(shifted & T.uint8(0xF0), "int8")


@functools.lru_cache(maxsize=None)
def w4ax_gemm(n: int, k: int, rank: int, act_bits: int = 4, has_bias: bool = False, out_dtype: str = "float16",
              block_n: int = 128, block_m: int = 128, block_k: int = 128, num_stages: int = 3,
              threads: int = 256, target=None):
    """Build (and cache) the kernel for one weight shape and tile configuration.

    Activations arrive as int8 (values in the int4 range for 4-bit sites: the quantize kernels write
    them unpacked, which costs M·K bytes but no unpacking on the tensor-core path). The weight tile is
    the wgmma A operand, unpacked in registers (wgmma_rs); the tokens are the wgmma N dimension, so
    a decode step (M = 1..16) wastes little of a 16-wide tile. Y is computed transposed in registers
    and written back through shared memory.

    Call it as kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y): y [M, n] is written, not
    allocated, so callers (CUDA graphs, tests that poison the output) own it. x_out / w_out are
    [M, max(rank, 16)] / [n, max(rank, 16)] and bias [n]; they are not read when rank == 0 / no bias.
    """
    assert act_bits in (4, 8) and k % block_k == 0 and n % block_n == 0 and rank % 16 == 0
    r = max(rank, 16)  # a zero-width outlier path still needs a legal tensor; it is skipped below

    @tilelang.jit(target=_TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            XQ: T.Tensor((m, k), "int8"),
            XS: T.Tensor((m,), "float32"),
            WQ: T.Tensor((n, k // 2), "uint8"),
            WS: T.Tensor((n,), "float16"),
            XO: T.Tensor((m, r), "float16"),
            WO: T.Tensor((n, r), "float16"),
            BIAS: T.Tensor((n,), "float16"),
            Y: T.Tensor((m, n), out_dtype),
        ):
            with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(m, block_m), threads=threads) as (bx, by):
                x_s = T.alloc_shared((block_m, block_k), "int8")
                w_packed = T.alloc_shared((block_n, block_k // 2), "uint8")
                w_l = T.alloc_fragment((block_n, block_k), "int8")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                out = T.alloc_fragment((block_n, block_m), "float32")
                out_s = T.alloc_shared((block_n, block_m), "float32")
                T.clear(acc)
                for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                    T.copy(XQ[by * block_m, kt * block_k], x_s)
                    T.copy(WQ[bx * block_n, kt * (block_k // 2)], w_packed)
                    for i, j in T.Parallel(block_n, block_k):
                        w_l[i, j] = _nibble_as_int8x16(w_packed[i, (j // 8) * 4 + j % 4], j % 8)
                    T.gemm(w_l, x_s, acc, transpose_B=True)
                T.clear(out)
                if rank > 0:
                    xo_s = T.alloc_shared((block_m, r), "float16")
                    wo_s = T.alloc_shared((block_n, r), "float16")
                    T.copy(XO[by * block_m, 0], xo_s)
                    T.copy(WO[bx * block_n, 0], wo_s)
                    T.gemm(wo_s, xo_s, out, transpose_B=True)
                for i, j in T.Parallel(block_n, block_m):
                    # acc holds Σ 16·qw·qx: the 16 of the weight nibble is folded in here.
                    x_scale = T.if_then_else(by * block_m + j < m, XS[by * block_m + j], T.float32(0))
                    out[i, j] = out[i, j] + T.Cast("float32", acc[i, j]) * (
                        x_scale * T.Cast("float32", WS[bx * block_n + i]) * T.float32(1.0 / 16))
                T.copy(out, out_s)
                for j, i in T.Parallel(block_m, block_n):
                    row = by * block_m + j
                    if row < m:
                        y = out_s[i, j]
                        if has_bias:
                            y = y + T.Cast("float32", BIAS[bx * block_n + i])
                        Y[row, bx * block_n + i] = T.Cast(out_dtype, y)

        return main

    return build()


DECODE_TILES = dict(block_n=64, block_m=16, block_k=256, num_stages=4, threads=128)


def tiles_for(m: int, n: int, k: int) -> dict:
    """Tile configuration by token count: a 16-token-wide tile for decode, 128 x 128 for prefill
    (64-row weight tiles when n, e.g. 4096 + r = 4160, is not a multiple of 128; 64-deep K tiles
    when k, e.g. SmolLM2's 576, is not a multiple of 128)."""
    if m <= 64:
        tiles = dict(DECODE_TILES)
    elif n % 128:
        tiles = dict(block_n=64, block_m=128, block_k=128, num_stages=3, threads=128)
    else:
        tiles = dict(block_n=128, block_m=128, block_k=128, num_stages=3, threads=256)
    while k % tiles["block_k"]:
        tiles["block_k"] //= 2
    return tiles


def w4ax_linear(x_q, x_scale, w_q, w_scale, x_out=None, w_out=None, bias=None, act_bits: int = 4,
                out_dtype=None):
    """Y = quant_linear(...) on the GPU, allocating Y (the dispatch layer's entry point)."""
    import torch

    m = x_q.shape[0]
    n, k = w_q.shape[0], w_q.shape[1] * 2
    rank = 0 if w_out is None else w_out.shape[1]
    out_dtype = out_dtype or torch.float16
    kernel = w4ax_gemm(n, k, rank, act_bits, bias is not None, str(out_dtype).removeprefix("torch."),
                       **tiles_for(m, n, k))
    dev = x_q.device
    if rank == 0:
        x_out = torch.zeros(m, 16, dtype=torch.float16, device=dev)
        w_out = torch.zeros(n, 16, dtype=torch.float16, device=dev)
    if bias is None:
        bias = torch.zeros(n, dtype=torch.float16, device=dev)
    y = torch.empty(m, n, dtype=out_dtype, device=dev)
    kernel(x_q, x_scale.reshape(-1).float(), w_q, w_scale.reshape(-1).half(), x_out.half(), w_out.half(),
           bias.half(), y)
    return y
