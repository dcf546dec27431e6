"""Decode GEMM variants with the int4 weights unpacked in registers (TileLang, Hopper).

The decode kernels of `kernels_tl.gemm` bring each packed weight tile to shared memory, unpack it
there into a second, int8 tile (plain stores, a proxy fence and a block barrier) and feed both
operands to wgmma from shared memory. At 16-32 tokens they read the weights at 30-45% of the copy
bandwidth (bench/results/decode_sweep_h200_2026-11-30.json): one 1024-wide K tile pipeline per SM
(~200 KB of shared memory a block) whose unpack stalls the tensor cores of its own warps.

Here the weight tile goes from shared memory straight into registers, each thread unpacks the bytes
of its own part of the wgmma A operand (the 64 weight rows are wgmma's M side), and wgmma reads A
from registers and the token tile from shared memory. No int8 tile in shared memory, no fence,
no barrier between unpack and multiply; a stage is 16 KB at a 256-wide K tile and 32 tokens, so
several blocks fit a SM and keep more loads in flight.

Same numerics as `kernels_tl.gemm`: the unpacked int8 holds 16·q (the checkpoint's nibble shifted
into the high half of the byte: two's complement, so the sign comes for free), the int32 sums are
exact and the epilogue folds the 16 in (`gemm._decode_epilogue`). Not yet run on a GPU: the
engine takes these kernels with QUAD_DECODE_RS=1 (`gemm_dispatch`); the GPU GEMM tests and
bench/kernels.py --sweep-decode cover them.
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.gemm import _TARGETS, _decode_epilogue
from kernels_tl.pdl import wait_for_producers


PRODUCER_REGS = 24  # the copy warpgroup's registers after setmaxnreg (TileLang's default)


def consumer_regs(min_blocks: int) -> int:
    """Registers a consumer thread may grow to (setmaxnreg) so that min_blocks blocks of one
    producer and one consumer warpgroup fit a SM's 64K registers: TileLang's default 240 assumes
    one block, and a setmaxnreg.inc that the register file cannot satisfy waits for other blocks
    to exit."""
    fit = 65536 // min_blocks // 128 - PRODUCER_REGS
    return min(240, fit - fit % 8)


@T.macro
def _occupancy(min_blocks: int):
    if min_blocks > 1:
        T.annotate_min_blocks_per_sm(min_blocks)
        T.annotate_producer_reg_dealloc(PRODUCER_REGS)
        T.annotate_consumer_reg_alloc(consumer_regs(min_blocks))


def _unpack_to_fragment(w_packed, w_local, w_frag, rows: int, block_k: int):
    """w_frag[i, j] = 16·q of weight (i, j) of the packed [rows, block_k / 2] tile in shared
    memory. The checkpoint's packing (docs/checkpoint-format.md) puts elements 8c + b and 8c + b + 4
    of a row in the low and high nibble of byte 4c + b (b < 4); shifting the nibble into the high
    half of an int8 gives 16·q with its sign."""

    @T.macro
    def unpack():
        T.copy(w_packed, w_local)
        for i, j in T.Parallel(rows, block_k):
            byte = w_local[i, (j // 8) * 4 + j % 4]
            shift = T.Cast("uint8", 4 - 4 * ((j % 8) // 4))    # low nibble: << 4; high nibble: as is
            w_frag[i, j] = T.reinterpret(T.Cast("uint8", (byte << shift) & T.uint8(0xF0)), "int8")

    return unpack


def _main_loop(XQ, WQ, acc, block_m: int, block_n: int, block_k: int, num_stages: int, k_tiles: int):
    """acc[weight row, token] = Σ 16·qw·qx over `k_tiles` K tiles from the block's first (bz-th
    range of k_tiles tiles, bz = 0 without split), the weights unpacked in registers."""

    @T.macro
    def main_loop(bx, by, bz):
        x_s = T.alloc_shared((block_m, block_k), "int8")
        w_packed = T.alloc_shared((block_n, block_k // 2), "uint8")
        w_local = T.alloc_fragment((block_n, block_k // 2), "uint8")
        w_frag = T.alloc_fragment((block_n, block_k), "int8")
        unpack = _unpack_to_fragment(w_packed, w_local, w_frag, block_n, block_k)
        T.clear(acc)
        for kt in T.Pipelined(k_tiles, num_stages=num_stages):
            T.copy(XQ[by * block_m, (bz * k_tiles + kt) * block_k], x_s)
            T.copy(WQ[bx * block_n, (bz * k_tiles + kt) * (block_k // 2)], w_packed)
            unpack()
            T.gemm(w_frag, x_s, acc, transpose_B=True)

    return main_loop


@functools.lru_cache(maxsize=None)
def w4ax_gemm_decode_rs(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                        block_m: int = 16, block_k: int = 256, num_stages: int = 4, min_blocks: int = 1,
                        target=None):
    """`gemm.w4ax_gemm_decode` (one block covers K, the epilogue in the same kernel) with the
    weights unpacked in registers; called the same way:
    kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y)."""
    block_n = 64
    assert k % block_k == 0 and n % block_n == 0 and rank % 16 == 0
    r = max(rank, 16)

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
            with T.Kernel(n // block_n, T.ceildiv(m, block_m), threads=128) as (bx, by):
                _occupancy(min_blocks)
                wait_for_producers("gemm")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                out = T.alloc_fragment((block_n, block_m), "float32")
                out_s = T.alloc_shared((block_n, block_m), "float32")
                _main_loop(XQ, WQ, acc, block_m, block_n, block_k, num_stages, k // block_k)(bx, by, 0)
                _decode_epilogue(acc, out, out_s, XS, WS, XO, WO, BIAS, Y, m, bx, by, rank, r, has_bias, out_dtype,
                                 block_n, block_m)

        return main

    return build()


@functools.lru_cache(maxsize=None)
def w4ax_gemm_splitk_rs(n: int, k: int, split: int, block_m: int = 16, block_k: int = 256, num_stages: int = 4,
                        min_blocks: int = 1, target=None):
    """`gemm.w4ax_gemm_splitk` (ACC[M, n] += Xq · Wqᵀ over one of `split` K ranges a block, int32
    atomics; `gemm.w4ax_epilogue` finishes) with the weights unpacked in registers; called as
    kernel(x_q, w_q, acc)."""
    block_n = 64
    assert k % (block_k * split) == 0 and n % block_n == 0
    k_tiles = k // block_k // split

    @tilelang.jit(target=_TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(XQ: T.Tensor((m, k), "int8"), WQ: T.Tensor((n, k // 2), "uint8"), ACC: T.Tensor((m, n), "int32")):
            with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(m, block_m), split, threads=128) as (bx, by, bz):
                _occupancy(min_blocks)
                wait_for_producers("gemm")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                _main_loop(XQ, WQ, acc, block_m, block_n, block_k, num_stages, k_tiles)(bx, by, bz)
                for i, j in T.Parallel(block_n, block_m):
                    if by * block_m + j < m:
                        T.atomic_add(ACC[by * block_m + j, bx * block_n + i], acc[i, j])

        return main

    return build()
