"""The W4 GEMV (TileLang, CUDA cores): `reference.quant_linear` for M <= 4 tokens, the decode
path's kernel at batch 1-4 (`kernels_tl.gemm_dispatch` picks it).

At a few tokens the GEMM is a matrix-vector product bound by reading the packed weight once; the
tensor-core kernels of `kernels_tl.gemm` would spend most of their time staging tiles through
shared memory. Here each 16-byte chunk of packed weights goes from global memory straight into
dp4a (the unpack is two logic ops per 4 values, as in the tensor-core kernels: the checkpoint's
packing, docs/checkpoint-format.md), against int8 activation chunks reused across a warp's rows.
M is dynamic: one compiled kernel serves every token count up to its `tokens`.

(Running the next norm in the last block to finish, after an atomic count, measured no faster
than the separate norm kernel: docs/results.md, 2026-12-01.)
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.pdl import prefetch_weights, wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

PREFETCH_GEMV_WEIGHTS = prefetch_weights("gemv")

_DOT_SRC = r"""
// acc + <16*w, x> over 32 values: w = 16 packed bytes (8-interleaved int4), x = 32 int8 in K order.
__device__ __forceinline__ int quad_dot_int4x32(const void* w_ptr, const void* x_ptr, int acc) {
  const uint4 w = *reinterpret_cast<const uint4*>(w_ptr);
  const uint4 x0 = reinterpret_cast<const uint4*>(x_ptr)[0];
  const uint4 x1 = reinterpret_cast<const uint4*>(x_ptr)[1];
  acc = __dp4a((int)((w.x << 4) & 0xF0F0F0F0u), (int)x0.x, acc);
  acc = __dp4a((int)(w.x & 0xF0F0F0F0u), (int)x0.y, acc);
  acc = __dp4a((int)((w.y << 4) & 0xF0F0F0F0u), (int)x0.z, acc);
  acc = __dp4a((int)(w.y & 0xF0F0F0F0u), (int)x0.w, acc);
  acc = __dp4a((int)((w.z << 4) & 0xF0F0F0F0u), (int)x1.x, acc);
  acc = __dp4a((int)(w.z & 0xF0F0F0F0u), (int)x1.y, acc);
  acc = __dp4a((int)((w.w << 4) & 0xF0F0F0F0u), (int)x1.z, acc);
  acc = __dp4a((int)(w.w & 0xF0F0F0F0u), (int)x1.w, acc);
  return acc;
}
"""


@functools.lru_cache(maxsize=None)
def w4ax_gemv(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16", tokens: int = 1,
              rows_per_warp: int = 4, warps: int = 4, unroll: int = 2, prefetch: bool = PREFETCH_GEMV_WEIGHTS,
              target=None):
    """The small-batch kernel (M <= `tokens`): a GEMV on the CUDA cores, no tensor cores, no shared
    memory, everything in one pass. Each warp owns `rows_per_warp` weight rows; each lane streams
    16-byte packed chunks of them (`unroll` chunks per row in flight before the first use) and
    reuses every activation chunk it loads across its rows. Unpacked words go straight into dp4a;
    lanes are reduced with warp shuffles, and lane 0 adds the fp16 outlier product, the scales and
    the bias. Called like the prefill kernel: kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y).
    prefetch: request the first step's weights before waiting for the previous kernel (kernels_tl.pdl).
    """
    r = max(rank, 16)
    rows_per_block = rows_per_warp * warps
    chunks = k // 32  # 16-byte packed chunks per weight row
    steps = -(-chunks // (32 * unroll))
    assert k % 32 == 0 and n % rows_per_block == 0 and r % 32 == 0 or rank == 0
    blocks = n // rows_per_block

    @T.macro
    def load_weights(WQ, w_loc, row0, lane, step):
        """This lane's packed weight chunks of one step into w_loc (zeros past the row's end)."""
        for u in T.unroll(unroll):
            chunk = (step * unroll + u) * 32 + lane
            for rw in T.unroll(rows_per_warp):
                for v in T.vectorized(16):
                    w_loc[(rw * unroll + u) * 16 + v] = T.if_then_else(
                        chunk < chunks, WQ[row0 + rw, chunk * 16 + v], T.uint8(0))

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.macro
        def gemv(XQ, XS, WQ, WS, XO, WO, BIAS, Y, bx):
            tx = T.get_thread_binding()
            lane = tx % 32
            row0 = bx * rows_per_block + (tx // 32) * rows_per_warp
            w_loc = T.alloc_local((rows_per_warp * unroll * 16,), "uint8")
            x_loc = T.alloc_local((tokens * unroll * 32,), "int8")
            acc = T.alloc_local((tokens * rows_per_warp,), "int32")
            scale = T.alloc_local((tokens * rows_per_warp,), "float32")
            extra = T.alloc_local((tokens * rows_per_warp,), "float32")
            T.import_source(_DOT_SRC)

            # The first step's weight chunks (a K of 4096 takes two steps) are requested before
            # the wait for the previous kernel: weights are never written, and with programmatic
            # dependent launch these loads overlap that kernel's tail.
            if prefetch:
                load_weights(WQ, w_loc, row0, lane, 0)
            wait_for_producers("gemv")
            # The epilogue's operands (scales, bias, this lane's share of the outlier product)
            # are loaded before the main loop, so their latency hides under the weight stream.
            for t in T.unroll(tokens):
                for rw in T.unroll(rows_per_warp):
                    i = t * rows_per_warp + rw
                    acc[i] = 0
                    scale[i] = T.if_then_else(t < m, XS[t], T.float32(0)) * T.Cast(
                        "float32", WS[row0 + rw]) * T.float32(1.0 / 16)
                    extra[i] = 0
                    for c in T.unroll(rank // 32):
                        extra[i] = extra[i] + T.if_then_else(
                            t < m, T.Cast("float32", XO[t, lane * (rank // 32) + c]), T.float32(0)) * T.Cast(
                            "float32", WO[row0 + rw, lane * (rank // 32) + c])
            for step in T.unroll(steps):
                # All loads of a step first (independent, in flight together), then the math.
                if step > 0 or not prefetch:
                    load_weights(WQ, w_loc, row0, lane, step)
                for u in T.unroll(unroll):
                    chunk = (step * unroll + u) * 32 + lane
                    for t in T.unroll(tokens):
                        for v in T.vectorized(32):
                            x_loc[(t * unroll + u) * 32 + v] = T.if_then_else(
                                chunk < chunks and t < m, XQ[t, chunk * 32 + v], T.int8(0))
                for u in T.unroll(unroll):
                    for rw in T.unroll(rows_per_warp):
                        for t in T.unroll(tokens):
                            acc[t * rows_per_warp + rw] = T.call_extern(
                                "int32", "quad_dot_int4x32", T.address_of(w_loc[(rw * unroll + u) * 16]),
                                T.address_of(x_loc[(t * unroll + u) * 32]), acc[t * rows_per_warp + rw])
            for t in T.unroll(tokens):
                for rw in T.unroll(rows_per_warp):
                    i = t * rows_per_warp + rw
                    y = T.Cast("float32", T.warp_reduce_sum(acc[i])) * scale[i]
                    if rank > 0:
                        y = y + T.warp_reduce_sum(extra[i])
                    if has_bias:
                        y = y + T.Cast("float32", BIAS[row0 + rw])
                    if lane == 0 and t < m:
                        Y[t, row0 + rw] = T.Cast(out_dtype, y)

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
            with T.Kernel(blocks, threads=warps * 32) as bx:
                gemv(XQ, XS, WQ, WS, XO, WO, BIAS, Y, bx)

        return main

    return build()
