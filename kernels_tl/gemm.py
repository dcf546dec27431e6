"""W4A4 / W4A8 GEMM with the fused fp16 outlier path (TileLang, Hopper): the prefill kernel and
what the GEMM kernels share.

Computes exactly `reference.quant_linear` for per-row weight scales:

    Y = (Xq · Wqᵀ) · sx · swᵀ  +  X_out · W_outᵀ  (+ bias)

Hopper has no fast int4 tensor-core path, so int4 is only the storage format. Each K tile of the
packed weight is brought to shared memory by the copy engine, unpacked to int8 holding 16·q
(two logic ops per 4 values: the checkpoint's packing, docs/checkpoint-format.md, is laid out for
exactly this) and multiplied on int8 wgmma into an int32 accumulator. The 16 is folded into the
epilogue scale, so the integer part is exact. Activations arrive as int8 (4-bit values stored
unpacked: the tensor cores want int8 operands, and an activation tile is read once per weight tile).

Kernels, chosen by token count in `kernels_tl.gemm_dispatch` (whose `w4ax_linear` is the entry
point):
- GEMV (M <= 4): `kernels_tl.gemv.w4ax_gemv`, int8 dot products (dp4a) on the CUDA cores, one pass
  over the weight.
- decode (M <= 64): `kernels_tl.gemm_decode`, the weight as the wgmma M side.
- prefill (M > 64): `w4ax_gemm` here (tokens are the wgmma M side, 128- or 256-token tiles; the r
  outlier channels run as a second, fp16 wgmma into the float accumulator in the same kernel) and
  the producer-unpack form in `kernels_tl.gemm_ws`.
M is dynamic in all: one compiled kernel serves every token count of its class.
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.targets import SM90, TARGETS  # noqa: F401


_UNPACK_SRC = r"""
// 16 packed bytes = 32 int4 in the checkpoint's 8-interleaved order -> 32 int8 holding 16*q, in K
// order: each 32-bit word w gives elements 0..3 as (w << 4) & 0xF0F0F0F0 and 4..7 as w & 0xF0F0F0F0.
__device__ __forceinline__ void quad_unpack_int4x32(const void* src, void* dst_lo, void* dst_hi) {
  const uint4 p = *reinterpret_cast<const uint4*>(src);
  uint4 a, b;
  a.x = (p.x << 4) & 0xF0F0F0F0u; a.y = p.x & 0xF0F0F0F0u;
  a.z = (p.y << 4) & 0xF0F0F0F0u; a.w = p.y & 0xF0F0F0F0u;
  b.x = (p.z << 4) & 0xF0F0F0F0u; b.y = p.z & 0xF0F0F0F0u;
  b.z = (p.w << 4) & 0xF0F0F0F0u; b.w = p.w & 0xF0F0F0F0u;
  *reinterpret_cast<uint4*>(dst_lo) = a;
  *reinterpret_cast<uint4*>(dst_hi) = b;
}
"""


def _unpack_tile(wp_s, w_s, rows: int, block_k: int, threads: int):
    """Unpack a [rows, block_k / 2] packed tile in shared memory into w_s [rows, block_k] int8.

    Each thread turns 16 packed bytes into two 16-byte stores (a 16-byte chunk stays contiguous
    under the wgmma swizzle). The writes are plain stores that the tensor cores read next: fence
    into the async proxy, then a barrier of the threads that run this."""
    chunks = block_k // 32
    items = rows * chunks

    @T.macro
    def unpack():
        tx = T.get_thread_binding()
        for it in T.serial(-(-items // threads)):
            item = it * threads + tx
            row, col = item // chunks, item % chunks
            if items % threads == 0 or item < items:
                T.call_extern("handle", "quad_unpack_int4x32", T.address_of(wp_s[row, col * 16]),
                              T.address_of(w_s[row, col * 32]), T.address_of(w_s[row, col * 32 + 16]))
        T.fence_proxy_async()
        T.sync_threads()

    return unpack


def _prefill_epilogue(acc, out, XS, WS, XO, WO, BIAS, n: int, bx, by, rank: int, r: int, has_bias: bool,
                      block_m: int, block_n: int):
    """out [tokens, weight rows] of a prefill tile = acc · sx · sw / 16 + x_out · w_outᵀ + bias; the
    caller stores it. acc holds Σ 16·qw·qx: the 16 of the weight nibble is folded in here. The last
    weight tile may overhang n (4160 = 32.5 x 128): the copy engine zero-fills and clips those rows;
    the scale and bias loads are guarded here."""

    @T.macro
    def epilogue():
        for i, j in T.Parallel(block_m, block_n):
            col = bx * block_n + j
            out[i, j] = T.Cast("float32", acc[i, j]) * (XS[by * block_m + i] * T.Cast(
                "float32", T.if_then_else(col < n, WS[col], T.float16(0))) * T.float32(1.0 / 16))
        if rank > 0:
            xo_s = T.alloc_shared((block_m, r), "float16")
            wo_s = T.alloc_shared((block_n, r), "float16")
            T.copy(XO[by * block_m, 0], xo_s)
            T.copy(WO[bx * block_n, 0], wo_s)
            T.gemm(xo_s, wo_s, out, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        if has_bias:
            for i, j in T.Parallel(block_m, block_n):
                col = bx * block_n + j
                out[i, j] = out[i, j] + T.Cast("float32", T.if_then_else(col < n, BIAS[col], T.float16(0)))

    return epilogue()


@functools.lru_cache(maxsize=None)
def w4ax_gemm(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
              block_m: int = 128, block_n: int = 128, block_k: int = 128, num_stages: int = 3,
              threads: int = 256, target=None):
    """The prefill kernel for one weight shape and tile configuration, called as
    kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y).

    y [M, n] is written, not allocated, so callers (CUDA graphs, tests that poison the output) own
    it. x_out / w_out are [M, max(rank, 16)] / [n, max(rank, 16)] and bias [n]; they are not read
    when rank == 0 / no bias. `threads` counts the consumer warpgroups (each owns block_m /
    (threads / 128) tokens of the tile); TileLang adds one producer warpgroup for the copies.
    """
    assert k % block_k == 0 and rank % 16 == 0
    r = max(rank, 16)  # a zero-width outlier path still needs a legal tensor; it is skipped below

    @tilelang.jit(target=TARGETS[target])
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
                w_s = T.alloc_shared((block_n, block_k), "int8")
                acc = T.alloc_fragment((block_m, block_n), "int32")
                out = T.alloc_fragment((block_m, block_n), "float32")
                out_s = T.alloc_shared((block_m, block_n), out_dtype)
                T.import_source(_UNPACK_SRC)
                unpack = _unpack_tile(w_packed, w_s, block_n, block_k, threads)
                T.clear(acc)
                for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                    T.copy(XQ[by * block_m, kt * block_k], x_s)
                    T.copy(WQ[bx * block_n, kt * (block_k // 2)], w_packed)
                    unpack()
                    T.gemm(x_s, w_s, acc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    # w_s is rewritten next iteration: no warpgroup may still be reading it.
                    T.sync_threads()
                _prefill_epilogue(acc, out, XS, WS, XO, WO, BIAS, n, bx, by, rank, r, has_bias, block_m, block_n)
                T.copy(out, out_s)
                T.copy(out_s, Y[by * block_m, bx * block_n])

        return main

    return build()
