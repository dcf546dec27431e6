"""The prefill W4A4 / W4A8 GEMM with the weights unpacked into the wgmma's register operand.

The prefill kernels of `kernels_tl.gemm` and `kernels_tl.gemm_ws` put the tokens on the wgmma's M
side and the weights on its N side, which the tensor cores read from shared memory: every packed
weight tile is unpacked into an int8 tile there (a shared-memory read and two bytes written per
packed byte), then read by every m64 wgmma of the tile, beside the activation tile. At 256 x 128
tiles that is ~120 bytes a cycle of the SM's 128 (an m64n128k32 wgmma reads 6 KB in its 64
cycles, the unpack adds a quarter), so shared memory, not the tensor cores, sets the pace (gate_up
at 2048 tokens: ~990 int8 TOPS).

Here the roles are exchanged, as in the decode kernels: Yᵀ = W · Xᵀ, the weight rows are the M side
(one consumer warpgroup per 64 rows) and the tokens the N side (256 a tile, the widest wgmma). Each
thread unpacks its own A fragment from the packed tile in registers (`gemm_decode.
_register_unpack_gemm`), so shared memory carries the packed weights once and the activation
tile once per warpgroup: 8 KB per m64n256k32 wgmma (128 cycles), 64 bytes a cycle. The epilogue
(scales, the outlier product as a float16 wgmma with the weights as its M side, bias) runs on the
transposed tile, which is written to Y[token, row] through a padded shared tile so that the global
stores run along the rows. One tile a block and one block a SM: a tile's ramp and epilogue are not
hidden under another tile's K loop, so the epilogue's own loads are not left to it either: the
consumers issue the cp.async of the outlier tiles and of the tile's token and weight-row scales
before the K loop and wait for them after it (read in the epilogue, the scales were 128 dependent
global loads a thread). Same contract and numerics as `gemm.w4ax_gemm`: the integer part exact,
Y = acc · sx · sw / 16 + x_out · w_outᵀ + bias in float32, rounded once.
"""

import functools
import os

import tilelang
import tilelang.language as T
import tilelang.layout

from kernels_tl.gemm_decode import _register_unpack_gemm
from kernels_tl.hadamard_rows import _swiglu_f16
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# The outlier tiles (x_out, w_out) load by cp.async, issued before the K loop (QUAD_RS_PREFETCH=0:
# loaded after it, as plain loads). The producer warpgroup TileLang adds is threads 0..127.
PREFETCH_OUTLIERS = os.environ.get("QUAD_RS_PREFETCH", "1") != "0"
PRODUCER_THREADS = 128
# The tile's token and weight-row scales load by cp.async with the outlier tiles into shared memory
# (QUAD_RS_STAGE_SCALES=0: the epilogue reads them from global memory, 128 scalar loads a thread).
STAGE_SCALES = os.environ.get("QUAD_RS_STAGE_SCALES", "1") != "0"
_CP_ASYNC_SRC = r"""
__device__ __forceinline__ void quad_cp_async16_zfill(void* dst, const void* src, bool valid) {
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void quad_cp_async16_bytes(void* dst, const void* src, int bytes) {
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void quad_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Every consumer's pieces (outlier tiles, scales) landed and visible to the wgmma (async proxy):
// wait for this thread's copies, fence them to the async proxy, then a barrier of the consumer
// threads only (the producer warpgroup never reaches it; id 3 as TileLang's own consumer barriers).
__device__ __forceinline__ void quad_cp_async_ready(int consumers) {
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("bar.sync 3, %0;" :: "r"(consumers) : "memory");
}
"""

# float16 elements of padding a row of the output staging tile: rows of 128 outputs are 256 bytes,
# so without it the 8 rows (tokens) one store instruction of a warp touches share their banks.
STAGE_PAD = 8


def _weight_row(bx, i, block_w: int, pair: int, half: int, swiglu: bool):
    """The weight row of a tile's row i: consecutive rows, or (swiglu) gate rows then up rows."""
    if swiglu:
        return T.if_then_else(i < pair, bx * pair + i, half + bx * pair + i - pair)
    return bx * block_w + i


@functools.lru_cache(maxsize=None)
def w4ax_gemm_rs(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                 block_t: int = 256, block_w: int = 128, block_k: int = 128, num_stages: int = 3,
                 chunk: int | None = None, swiglu: bool = False, fast_silu: bool = False, target=None,
                 prefetch_outliers: bool | None = None, panel: int = 0,
                 stage_scales: bool | None = None):
    """kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y) as `gemm.w4ax_gemm` (y written;
    x_out / w_out / bias not read when rank == 0 / no bias). Tiles of block_w weight rows (a
    consumer warpgroup per 64) x block_t tokens, K tiles of block_k in num_stages TMA stages;
    chunk: the K columns of a register fragment (two fragments alternate where a K tile holds two
    or more chunks: one unpacked while the other's wgmmas run). A last weight tile that overhangs n
    (4160 = 32.5 x 128) is zero-filled by the copy engine and its rows are not stored.

    swiglu: the weight is the MLP's gate_up [n = 2h, K] (gate rows first) and y is silu(gate) * up
    [M, h] in torch's float16 arithmetic (gemm output rounded to float16, then
    hadamard_rows._swiglu_f16; fast_silu as there): a tile's first 64 rows are gate rows
    64·bx.., its last 64 the up rows h + 64·bx.. (two copies into the packed tile), so the epilogue
    has both halves of its 64 outputs in the staging tile. The down_proj quantizer then reads half
    the bytes and no longer computes the SwiGLU.

    panel: blocks run in panels of that many token tiles, all weight tiles of a panel before the
    next (TileLang's row rasterization), so the blocks running at once share their weight tiles
    through L2 (0: the launch order, every weight tile of one token tile before the next, which
    reads the weights from DRAM once per token tile)."""
    assert k % block_k == 0 and rank % 16 == 0 and block_w % 64 == 0 and block_t % 8 == 0 and block_t <= 256
    assert not swiglu or (block_w == 128 and n % 128 == 0 and out_dtype == "float16")
    half = n // 2  # swiglu: the up rows' offset, and y's width
    pair = block_w // 2  # swiglu: gate (or up) rows a tile
    r = max(rank, 16)
    chunk = chunk or min(block_k, 256)
    assert block_k % chunk == 0 and chunk % 32 == 0

    # Not with swiglu (off by default): its epilogue then spilled 84 bytes (ptxas).
    prefetch = rank > 0 and not swiglu and (PREFETCH_OUTLIERS if prefetch_outliers is None else prefetch_outliers)
    stage_scales = STAGE_SCALES if stage_scales is None else stage_scales
    assert not stage_scales or (block_t // 4 + block_w // 8 <= 2 * block_w and n % 8 == 0)
    asynchronous = prefetch or stage_scales  # the consumers wait for their cp.async after the K loop
    consumers = 2 * block_w  # the consumer warpgroups' threads, after the producer's 128
    chunks = r // 8  # 16-byte pieces of an outlier row
    assert not prefetch or (block_t * chunks % consumers == 0 and block_w * chunks % consumers == 0)

    @T.macro
    def load_outliers(XO, WO, xo_s, wo_s, bx, by, m):
        # Issued by the consumers before the main loop, waited for after it: the outlier tiles'
        # DRAM latency hides under the K loop instead of following it. Rows past the tokens or
        # the weight rows are zero-filled (cp.async with no source bytes).
        tx = T.get_thread_binding()
        if tx >= PRODUCER_THREADS:
            c = tx - PRODUCER_THREADS
            for it in T.unroll(block_t * chunks // consumers):
                row = (it * consumers + c) // chunks
                col = ((it * consumers + c) % chunks) * 8
                tok = by * block_t + row
                T.call_extern("handle", "quad_cp_async16_zfill", T.address_of(xo_s[row, col]),
                              T.address_of(XO[T.if_then_else(tok < m, tok, 0), col]), tok < m)
            for it in T.unroll(block_w * chunks // consumers):
                row = (it * consumers + c) // chunks
                col = ((it * consumers + c) % chunks) * 8
                w_row = _weight_row(bx, row, block_w, pair, half, swiglu)
                T.call_extern("handle", "quad_cp_async16_zfill", T.address_of(wo_s[row, col]),
                              T.address_of(WO[T.if_then_else(w_row < n, w_row, 0), col]), w_row < n)
            T.call_extern("handle", "quad_cp_async_commit")

    @T.macro
    def load_scales(XS, WS, xs_s, ws_s, bx, by, m):
        # Issued with the outlier tiles, waited for with them: a 16-byte piece a consumer thread, the
        # token scales first (the last piece cut at the tokens' end, the rest zero-filled), then the
        # weight rows' (zero past n; swiglu: gate rows then up rows, 8 a piece).
        tx = T.get_thread_binding()
        c = tx - PRODUCER_THREADS
        if tx >= PRODUCER_THREADS and c < block_t // 4:
            tok = by * block_t + c * 4
            T.call_extern("handle", "quad_cp_async16_bytes", T.address_of(xs_s[c * 4]),
                          T.address_of(XS[T.if_then_else(tok < m, tok, 0)]),
                          T.if_then_else(tok < m, T.min(m - tok, 4) * 4, 0))
        if tx >= PRODUCER_THREADS and c >= block_t // 4 and c < block_t // 4 + block_w // 8:
            row = _weight_row(bx, (c - block_t // 4) * 8, block_w, pair, half, swiglu)
            T.call_extern("handle", "quad_cp_async16_zfill", T.address_of(ws_s[(c - block_t // 4) * 8]),
                          T.address_of(WS[T.if_then_else(row < n, row, 0)]), row < n)
        if tx >= PRODUCER_THREADS:
            T.call_extern("handle", "quad_cp_async_commit")

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
            Y: T.Tensor((m, half if swiglu else n), out_dtype),
        ):
            with T.Kernel(T.ceildiv(n, block_w), T.ceildiv(m, block_t), threads=2 * block_w) as (bx, by):
                if panel:
                    T.use_swizzle(panel_size=panel, order="row")
                if asynchronous:
                    T.import_source(_CP_ASYNC_SRC)
                x_s = T.alloc_shared((block_t, block_k), "int8")
                w_packed = T.alloc_shared((block_w, block_k // 2), "uint8")
                frags = [T.alloc_fragment((block_w, chunk), "int8")
                         for _ in range(2 if (block_k // chunk) % 2 == 0 else 1)]
                T.annotate_layout({w_packed: tilelang.layout.make_swizzled_layout(w_packed)})
                acc = T.alloc_fragment((block_w, block_t), "int32")
                product = _register_unpack_gemm(w_packed, x_s, frags, acc, block_k, chunk, T.GemmWarpPolicy.FullRow)
                out = T.alloc_fragment((block_w, block_t), "float32")
                out_s = T.alloc_shared((block_t, block_w + STAGE_PAD), out_dtype)
                if rank > 0:
                    xo_s = T.alloc_shared((block_t, r), "float16")
                    wo_s = T.alloc_shared((block_w, r), "float16")
                    if prefetch:
                        load_outliers(XO, WO, xo_s, wo_s, bx, by, m)
                if stage_scales:
                    xs_s = T.alloc_shared((block_t,), "float32")
                    ws_s = T.alloc_shared((block_w,), "float16")
                    load_scales(XS, WS, xs_s, ws_s, bx, by, m)
                T.clear(acc)
                for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                    T.copy(XQ[by * block_t, kt * block_k], x_s)
                    if swiglu:
                        T.copy(WQ[bx * pair, kt * (block_k // 2)], w_packed[0:pair, :])
                        T.copy(WQ[half + bx * pair, kt * (block_k // 2)], w_packed[pair:block_w, :])
                    else:
                        T.copy(WQ[bx * block_w, kt * (block_k // 2)], w_packed)
                    product()
                if asynchronous:
                    T.call_extern("handle", "quad_cp_async_ready", consumers)
                if stage_scales:  # zero past the tokens and the weight rows, as below
                    for i, j in T.Parallel(block_w, block_t):
                        out[i, j] = T.Cast("float32", acc[i, j]) * (
                            xs_s[j] * T.Cast("float32", ws_s[i]) * T.float32(1.0 / 16))
                else:
                    for i, j in T.Parallel(block_w, block_t):
                        row = _weight_row(bx, i, block_w, pair, half, swiglu)
                        tok = by * block_t + j
                        out[i, j] = T.Cast("float32", acc[i, j]) * (
                            T.if_then_else(tok < m, XS[tok], T.float32(0))
                            * T.Cast("float32", T.if_then_else(row < n, WS[row], T.float16(0))) * T.float32(1.0 / 16))
                if rank > 0:
                    if not prefetch and swiglu:
                        T.copy(XO[by * block_t, 0], xo_s)
                        T.copy(WO[bx * pair, 0], wo_s[0:pair, :])
                        T.copy(WO[half + bx * pair, 0], wo_s[pair:block_w, :])
                    elif not prefetch:
                        T.copy(XO[by * block_t, 0], xo_s)
                        T.copy(WO[bx * block_w, 0], wo_s)
                    T.gemm(wo_s, xo_s, out, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                if has_bias:
                    for i, j in T.Parallel(block_w, block_t):
                        row = _weight_row(bx, i, block_w, pair, half, swiglu)
                        out[i, j] = out[i, j] + T.Cast("float32", T.if_then_else(row < n, BIAS[row], T.float16(0)))
                for i, j in T.Parallel(block_w, block_t):
                    out_s[j, i] = T.Cast(out_dtype, out[i, j])
                if swiglu:  # silu(gate) * up over the gate columns, in place, then stored 16 bytes a thread
                    for j, i in T.Parallel(block_t, pair):
                        out_s[j, i] = T.Cast("float16", _swiglu_f16(out_s[j, i], out_s[j, pair + i], fast_silu))
                    for j, i in T.Parallel(block_t, pair):
                        if by * block_t + j < m:
                            Y[by * block_t + j, bx * pair + i] = out_s[j, i]
                else:
                    for j, i in T.Parallel(block_t, block_w):
                        if by * block_t + j < m and bx * block_w + i < n:
                            Y[by * block_t + j, bx * block_w + i] = out_s[j, i]

        return main

    return build()
