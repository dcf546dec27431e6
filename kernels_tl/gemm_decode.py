"""The decode GEMMs (5-64 tokens) of `kernels_tl.gemm`'s W4A4 / W4A8 product.

Memory-bound, so the weight is the wgmma M side (64 rows) and the tokens the N side (16-64 wide).
Where the weight's 64-row tiles alone fill most of the GPU, one block covers all of K and applies
the epilogue itself (`w4ax_gemm_decode`: scales, the outlier product as a float16 wgmma, bias).
Otherwise K is split across blocks until the grid covers the GPU (`w4ax_gemm_splitk`): the split
partial sums are added as int32 (exact, order-independent) into a workspace, and `w4ax_epilogue`
applies the same epilogue and zeroes the workspace for the next call. `w4ax_gemm_decode` also
takes int8 weight rows (weight_bits 8: the int8 lm_head). With register_unpack (the dispatch's
default) both unpack the weights into the wgmma's register operand instead of an int8 tile in
shared memory (`_register_unpack_gemm`); with ws_blocks 2 (the dispatch's choice) two
warp-specialized blocks share a SM.
"""

import functools

import tilelang
import tilelang.language as T
import tilelang.layout

from kernels_tl.gemm import _UNPACK_SRC, _unpack_tile
from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401


def _decode_pass_configs(min_blocks: int) -> dict:
    """Build options of a decode kernel that must fit `min_blocks` blocks a SM. TileLang's warp
    specialization gives the consumer warpgroup 240 registers (setmaxnreg) and hence one block a SM:
    a block's pipeline ramp and epilogue then leave the SM's memory pipe idle (Nsight Compute, gate_up
    at 32 tokens: 33% of DRAM bandwidth, 87% of cycles without an eligible warp). Without it, the
    pipeline is cp.async issued by all 128 threads, and __launch_bounds__ caps the registers."""
    return {"tl.disable_warp_specialized": True} if min_blocks > 1 else {}


@T.macro
def _resident_warp_specialized(blocks: int):
    """blocks > 1: keep TileLang's warp specialization (a TMA producer warp group) but let `blocks`
    blocks share a SM: no setmaxnreg (it would give the consumer 240 registers, a SM's worth for one
    block) and __launch_bounds__(256, blocks), so ptxas fits each thread in 65536 / (256 · blocks)
    registers. One block's pipeline ramp and epilogue then overlap another's weight stream."""
    if blocks > 1:
        T.annotate_min_blocks_per_sm(blocks)
        T.no_set_max_nreg()


# K columns a register-unpacked weight fragment holds: 64 x 256 int8 are 32 registers a thread.
REGISTER_CHUNK = 256


def _register_chunk(block_k: int) -> int:
    """The fragment's K columns for a K tile: REGISTER_CHUNK, or the whole tile where it is smaller
    (SmolLM2's 576-wide K runs 64-wide tiles)."""
    assert block_k % 32 == 0  # the int8 wgmma's K step
    return min(REGISTER_CHUNK, block_k)


def _register_unpack_gemm(wp_s, x_s, w_frags, acc, block_k: int, chunk: int | None = None, policy=None):
    """acc += unpack(wp_s) · x_sᵀ with the unpacked weights in registers, never in shared memory.

    The staged-unpack kernels write each K tile back to shared memory as int8 for the tensor cores
    to read: per byte of packed weight from DRAM, shared memory carries its TMA write, its read, two
    bytes written and two read by the wgmma, plus the activation tile: at 32 tokens the L1 / shared
    pipe ran at 74% with DRAM at 33% (bench/results/ncu_decode_h200_2026-12-01.txt). Here each
    thread reads the packed bytes of its own wgmma A-fragment (64 weight rows are the M side) and
    unpacks them in registers (a 32-bit word holds K elements 0..3 in its low nibbles and 4..7 in
    its high ones, docs/checkpoint-format.md), and the wgmma takes A from registers. wp_s is
    swizzled so the eight rows a warp reads at once fall in different banks.

    With one fragment (w_frags of length 1) each chunk's wgmmas are waited for before the next
    chunk is unpacked. With two, the chunks alternate between them and the wgmmas run
    asynchronously: chunk c + 1 is unpacked while chunk c's wgmmas run (one wgmma group in flight;
    the wait before an unpack is for the group that read the fragment about to be rewritten), so
    the single consumer warpgroup's unpack and the tensor cores overlap instead of taking turns.

    The weight rows are the fragments' first dimension: 64 in the decode kernels (one consumer
    warpgroup); the prefill kernel `gemm_rs.w4ax_gemm_rs` has a warpgroup per 64 rows, laid out by
    `policy`. chunk: the fragments' K columns (default _register_chunk)."""

    chunk = chunk or _register_chunk(block_k)
    chunks = block_k // chunk
    rows = w_frags[0].shape[0]
    gemm_args = {} if policy is None else {"policy": policy}

    @T.macro
    def unpack(c, w_frag):
        for i, kk in T.Parallel(rows, chunk):
            byte = wp_s[i, c * (chunk // 2) + (kk // 8) * 4 + kk % 4]
            w_frag[i, kk] = T.Cast("int8", T.if_then_else((kk // 4) % 2 == 0, (byte << T.uint8(4)) & T.uint8(0xF0),
                                                          byte & T.uint8(0xF0)))

    @T.macro
    def pair(c, fa, fb):  # chunk c's wgmmas from fragment fa while chunk c + 1 is unpacked into fb
        T.wgmma_gemm(fa, x_s[:, c * chunk:(c + 1) * chunk], acc, transpose_B=True, **gemm_args)
        T.wait_wgmma(1)  # chunk c - 1's wgmmas, the last readers of fb
        unpack(c + 1, fb)

    @T.macro
    def run():
        if len(w_frags) == 1:
            for c in T.serial(chunks):
                unpack(c, w_frags[0])
                T.gemm(w_frags[0], x_s[:, c * chunk:(c + 1) * chunk], acc, transpose_B=True, **gemm_args)
        else:
            f0, f1 = w_frags
            unpack(0, f0)
            if chunks > 2:
                for c2 in T.serial(chunks // 2 - 1):
                    pair(2 * c2, f0, f1)
                    pair(2 * c2 + 1, f1, f0)
            pair(chunks - 2, f0, f1)
            # The last chunk synchronously: its wait covers every wgmma of the tile before the
            # pipeline releases the stage (an explicit wait would be placed after the release).
            T.gemm(f1, x_s[:, (chunks - 1) * chunk:chunks * chunk], acc, transpose_B=True, **gemm_args)

    return run


def _decode_weight_product(wp_s, x_s, block_n: int, block_k: int, register_unpack: bool, overlap: bool = False):
    """product(acc): acc += unpack(wp_s) · x_sᵀ for a decode kernel's pipelined K tile, and the
    buffers it needs: the register-operand unpack (_register_unpack_gemm; overlap: two fragments,
    the unpack of one chunk beside the wgmmas of the last), or the staged unpack into an int8 tile in
    shared memory (then the barrier: the tile is rewritten next iteration)."""
    if register_unpack:
        chunk = _register_chunk(block_k)
        frags = [T.alloc_fragment((block_n, chunk), "int8")
                 for _ in range(2 if overlap and (block_k // chunk) % 2 == 0 else 1)]
        T.annotate_layout({wp_s: tilelang.layout.make_swizzled_layout(wp_s)})
        return lambda acc: _register_unpack_gemm(wp_s, x_s, frags, acc, block_k)()
    w_s = T.alloc_shared((block_n, block_k), "int8")
    T.import_source(_UNPACK_SRC)
    unpack = _unpack_tile(wp_s, w_s, block_n, block_k, 128)

    @T.macro
    def staged(acc):
        unpack()
        T.gemm(w_s, x_s, acc, transpose_B=True)
        T.sync_threads()

    return staged


@functools.lru_cache(maxsize=None)
def w4ax_gemm_splitk(n: int, k: int, split: int, block_m: int = 16, block_n: int = 64, block_k: int = 256,
                     num_stages: int = 4, target=None, min_blocks: int = 1, register_unpack: bool = False,
                     overlap_unpack: bool = False, ws_blocks: int = 1):
    """The decode kernel: ACC[M, n] += Xq · Wqᵀ (int32, 16·q weights) over one of `split` K ranges
    per block, called as kernel(x_q, w_q, acc). ACC must be zero before the first split lands;
    `w4ax_epilogue` reads it and zeroes it again. min_blocks > 1: built to run that many blocks a
    SM (see _decode_pass_configs; the tiles' shared memory must fit too). register_unpack: the
    weights are unpacked into the wgmma's register operand (_register_unpack_gemm); overlap_unpack
    (with it): into two fragments, each chunk's unpack beside the last chunk's wgmmas."""
    assert k % (block_k * split) == 0 and n % block_n == 0 and block_n == 64
    k_tiles = k // block_k // split

    @tilelang.jit(target=TARGETS[target], pass_configs=_decode_pass_configs(min_blocks))
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(XQ: T.Tensor((m, k), "int8"), WQ: T.Tensor((n, k // 2), "uint8"), ACC: T.Tensor((m, n), "int32")):
            with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(m, block_m), split, threads=128) as (bx, by, bz):
                if min_blocks > 1:
                    T.annotate_min_blocks_per_sm(min_blocks)
                _resident_warp_specialized(ws_blocks)
                wait_for_producers("gemm")
                x_s = T.alloc_shared((block_m, block_k), "int8")
                w_packed = T.alloc_shared((block_n, block_k // 2), "uint8")
                product = _decode_weight_product(w_packed, x_s, block_n, block_k, register_unpack, overlap_unpack)
                acc = T.alloc_fragment((block_n, block_m), "int32")
                T.clear(acc)
                for kt in T.Pipelined(k_tiles, num_stages=num_stages):
                    T.copy(XQ[by * block_m, (bz * k_tiles + kt) * block_k], x_s)
                    T.copy(WQ[bx * block_n, (bz * k_tiles + kt) * (block_k // 2)], w_packed)
                    product(acc)
                for i, j in T.Parallel(block_n, block_m):
                    if by * block_m + j < m:
                        T.atomic_add(ACC[by * block_m + j, bx * block_n + i], acc[i, j])

        return main

    return build()


@functools.lru_cache(maxsize=None)
def w4ax_gemm_decode(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                     block_m: int = 16, block_k: int = 1024, num_stages: int = 2, weight_bits: int = 4,
                     target=None, min_blocks: int = 1, register_unpack: bool = False,
                     overlap_unpack: bool = False, ws_blocks: int = 1):
    """The decode kernel where one block covers all of K (split 1): the split-K kernel's main loop
    (64 weight rows as the wgmma M side, the tokens as N) with the epilogue in the same kernel (the
    scales, the outlier product as a float16 wgmma on a [64, r] weight tile, the bias), so there is
    no workspace round trip and no second launch. Called like the prefill kernel:
    kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y).

    weight_bits 8: int8 weight rows [n, k] with float32 row scales, copied straight to the tensor
    cores (the int8 lm_head, `ops.head_w8a8`). min_blocks, register_unpack, overlap_unpack (int4
    weights): as w4ax_gemm_splitk's."""
    block_n = 64
    assert k % block_k == 0 and n % block_n == 0 and rank % 16 == 0 and weight_bits in (4, 8)
    assert not register_unpack or weight_bits == 4
    r = max(rank, 16)
    packed = weight_bits == 4
    w_cols, w_dtype = (k // 2, "uint8") if packed else (k, "int8")
    scale_dtype = "float16" if packed else "float32"

    @tilelang.jit(target=TARGETS[target], pass_configs=_decode_pass_configs(min_blocks))
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            XQ: T.Tensor((m, k), "int8"),
            XS: T.Tensor((m,), "float32"),
            WQ: T.Tensor((n, w_cols), w_dtype),
            WS: T.Tensor((n,), scale_dtype),
            XO: T.Tensor((m, r), "float16"),
            WO: T.Tensor((n, r), "float16"),
            BIAS: T.Tensor((n,), "float16"),
            Y: T.Tensor((m, n), out_dtype),
        ):
            with T.Kernel(n // block_n, T.ceildiv(m, block_m), threads=128) as (bx, by):
                if min_blocks > 1:
                    T.annotate_min_blocks_per_sm(min_blocks)
                _resident_warp_specialized(ws_blocks)
                wait_for_producers("gemm")
                x_s = T.alloc_shared((block_m, block_k), "int8")
                if packed:
                    w_packed = T.alloc_shared((block_n, block_k // 2), "uint8")
                    product = _decode_weight_product(w_packed, x_s, block_n, block_k, register_unpack, overlap_unpack)
                else:
                    w_s = T.alloc_shared((block_n, block_k), "int8")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                out = T.alloc_fragment((block_n, block_m), "float32")
                out_s = T.alloc_shared((block_n, block_m), "float32")
                T.clear(acc)
                if packed:
                    for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                        T.copy(XQ[by * block_m, kt * block_k], x_s)
                        T.copy(WQ[bx * block_n, kt * (block_k // 2)], w_packed)
                        product(acc)
                else:
                    for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                        T.copy(XQ[by * block_m, kt * block_k], x_s)
                        T.copy(WQ[bx * block_n, kt * block_k], w_s)
                        T.gemm(w_s, x_s, acc, transpose_B=True)
                _decode_epilogue(acc, out, out_s, XS, WS, XO, WO, BIAS, Y, m, bx, by, rank, r, has_bias, out_dtype,
                                 block_n, block_m, 1.0 / 16 if packed else 1.0)

        return main

    return build()


def _decode_epilogue(acc, out, out_s, XS, WS, XO, WO, BIAS, Y, m, bx, by, rank: int, r: int, has_bias: bool,
                     out_dtype: str, block_n: int, block_m: int, int_factor: float = 1.0 / 16):
    """out[i, j] (weight row i, token j of the tile) = acc · sx · sw · int_factor (1/16: the int4
    weights' 16·q) + x_out · w_outᵀ + bias,
    written to Y[token, row] through shared memory (so the global stores run along the rows)."""

    @T.macro
    def epilogue():
        for i, j in T.Parallel(block_n, block_m):
            row = by * block_m + j
            out[i, j] = T.Cast("float32", acc[i, j]) * (T.if_then_else(row < m, XS[row], T.float32(0)) * T.Cast(
                "float32", WS[bx * block_n + i]) * T.float32(int_factor))
        if rank > 0:
            xo_s = T.alloc_shared((block_m, r), "float16")
            wo_s = T.alloc_shared((block_n, r), "float16")
            T.copy(XO[by * block_m, 0], xo_s)
            T.copy(WO[bx * block_n, 0], wo_s)
            T.gemm(wo_s, xo_s, out, transpose_B=True)
        if has_bias:
            for i, j in T.Parallel(block_n, block_m):
                out[i, j] = out[i, j] + T.Cast("float32", BIAS[bx * block_n + i])
        T.copy(out, out_s)
        for j, i in T.Parallel(block_m, block_n):
            if by * block_m + j < m:
                Y[by * block_m + j, bx * block_n + i] = T.Cast(out_dtype, out_s[i, j])

    return epilogue()


@functools.lru_cache(maxsize=None)
def w4ax_epilogue(n: int, rank: int, has_bias: bool = False, out_dtype: str = "float16", block_m: int = 16,
                  target=None):
    """Y = ACC · sx · sw / 16 + X_out · W_outᵀ + bias for the split-K kernel's int32 sums, zeroing
    ACC; called as kernel(acc, x_scale, w_scale, x_out, w_out, bias, y). One block per 64 outputs x
    block_m tokens, the decode kernel's epilogue: the outlier product on the tensor cores with each
    [64, r] weight tile read once per token tile (not once per token)."""
    block_n = 64
    r = max(rank, 16)
    assert n % block_n == 0 and rank % 16 == 0

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(ACC: T.Tensor((m, n), "int32"), XS: T.Tensor((m,), "float32"), WS: T.Tensor((n,), "float16"),
                 XO: T.Tensor((m, r), "float16"), WO: T.Tensor((n, r), "float16"), BIAS: T.Tensor((n,), "float16"),
                 Y: T.Tensor((m, n), out_dtype)):
            with T.Kernel(n // block_n, T.ceildiv(m, block_m), threads=128) as (bx, by):
                wait_for_producers("gemm_epilogue")
                acc_s = T.alloc_shared((block_m, block_n), "int32")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                out = T.alloc_fragment((block_n, block_m), "float32")
                out_s = T.alloc_shared((block_n, block_m), "float32")
                T.copy(ACC[by * block_m, bx * block_n], acc_s)
                for i, j in T.Parallel(block_n, block_m):
                    acc[i, j] = acc_s[j, i]
                T.sync_threads()  # every thread's tile read is done before any of it is zeroed
                for j, i in T.Parallel(block_m, block_n):  # the workspace is zero again for the next call
                    if by * block_m + j < m:
                        ACC[by * block_m + j, bx * block_n + i] = 0
                _decode_epilogue(acc, out, out_s, XS, WS, XO, WO, BIAS, Y, m, bx, by, rank, r, has_bias, out_dtype,
                                 block_n, block_m)

        return main

    return build()
