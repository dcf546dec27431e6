"""The online Hadamard + per-token quantization of a square row, n = E · E (E = 32 or 64: 1024 and
4096 wide, the o_proj input of Llama-3-8B-class models), in two register passes.

The one-block kernel (`kernels_tl.hadamard_quant`) runs a 4096-wide row as four shared-memory
passes of 128 threads (3 butterfly bits a pass, a barrier after each): 18.5 µs at 2048 tokens on an
H200, 1.36 TB/s, a third of the copy bandwidth, and it got faster with fewer threads a row
(256 threads 24.8 µs; bench/results/hadamard_sweep_h200_2026-11-30.json). Here E threads take a
row, viewed as an E x E matrix (position s = E·r + c):
1. thread r loads row r's E adjacent float16 values (16-byte loads), runs the log2 E butterfly
   stages of the low index bits in registers and stores them, swizzled, into shared memory;
2. after one barrier thread c reads column c (E values E apart), runs the stages of the high bits
   in registers, scales by 1 / E, and after the token's amax writes its E codes, a warp's 32
   lanes writing 32 adjacent bytes at a time.
So one shared-memory round trip and two barriers a row, E values a thread in registers, and
ROWS rows a block (128 threads). The butterfly stages commute (they act on different index bits),
so the transform is the Sylvester Hadamard the reference applies; only the float32 summation
order differs from the other kernels', and codes agree with the reference to the quantizer
tolerance.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.pdl import wait_for_producers
from kernels_tl.quantize import _PASS_CONFIGS, _qmax, _quantize, _token_scale
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# Rows a block (its threads: ROWS · E) and the blocks a SM its build asks for: 128 threads, and at
# most 128 registers a thread (65536 / (128 · 4)).
ROWS = {32: 4, 64: 2}
MIN_BLOCKS = 4


def square_side(n: int) -> int | None:
    """E with n = E · E and E in (32, 64), else None."""
    e = math.isqrt(n)
    return e if e * e == n and e in (32, 64) else None


def square_fits(n: int, factors, block, gated: bool) -> bool:
    """Rows this kernel takes: one Sylvester Hadamard over a plain (not gated) square row."""
    return not gated and block is None and tuple(factors) == (n,) and square_side(n) is not None


def _swizzled(r, c, e: int):
    """Shared-memory index of (row r, column c) within a row's E x E block: the 16-byte chunk c // 4
    XORed with r mod (E / 4), written as a product of 4 so that the vectorizer sees the alignment.
    Pass 1's float4 stores (8 lanes: 8 rows, one chunk each) and pass 2's scalar loads (32 lanes:
    32 adjacent columns of one row) are both conflict-free. The kernel writes the two forms of it
    each pass can hoist; tests/test_quantize_build.py holds them to this definition."""
    return r * e + ((c // 4) ^ (r % (e // 4))) * 4 + c % 4


@T.macro
def _butterfly(v, tmp, size: int):
    """The log2(size) Walsh–Hadamard stages of v[0 : size] in place: (a, b) -> (a + b, a - b)."""
    for s in list(range(size.bit_length() - 1)):
        bit = 1 << s
        for u in [u for u in range(size) if not u & bit]:
            tmp[0] = v[u]
            v[u] = tmp[0] + v[u + bit]
            v[u + bit] = tmp[0] - v[u + bit]


@functools.lru_cache(maxsize=None)
def _hadamard_quant_square(n: int, bits: int, clip: float, target, rows: int | None, stage_codes: bool):
    _qmax(bits)
    e = square_side(n)
    assert e is not None, n
    tokens = rows or ROWS[e]  # rows a block
    threads = tokens * e
    warps = e // 32           # warps a row
    norm = 1.0 / e            # 1 / sqrt(n), a power of two
    min_blocks = max(1, MIN_BLOCKS * 128 // threads)

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, n), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(T.ceildiv(m, tokens), threads=threads) as bx:
                T.annotate_min_blocks_per_sm(min_blocks)
                wait_for_producers("hadamard_quant")
                tx = T.get_thread_binding()
                slot, i = tx // e, tx % e
                tok = bx * tokens + slot
                # The block's rows in float32 (swizzled), then one amax slot a warp.
                S = T.alloc_shared((tokens * n + threads // 32,), "float32")
                xin = T.alloc_local((e,), "float16")
                v = T.alloc_local((e,), "float32")
                tmp = T.alloc_local((1,), "float32")
                base = slot * n
                # 1. Row i of the token's E x E view: the low index bits.
                if tok < m:
                    for c in T.unroll(e // 8):
                        for k in T.vectorized(8):
                            xin[c * 8 + k] = X[tok, i * e + c * 8 + k]
                    for u in T.unroll(e):
                        v[u] = T.Cast("float32", xin[u])
                else:
                    for u in T.unroll(e):
                        v[u] = T.float32(0)
                _butterfly(v, tmp, e)
                for q in T.unroll(e // 4):
                    for k in T.vectorized(4):
                        S[base + i * e + (q ^ (i % (e // 4))) * 4 + k] = v[q * 4 + k]
                T.sync_threads()
                # 2. Column i: the high index bits, then the scale and the token's amax.
                for u in T.unroll(e):
                    v[u] = S[base + u * e + (i ^ ((u % (e // 4)) * 4))]
                _butterfly(v, tmp, e)
                amax = T.alloc_var("float32", init=0)
                for u in T.unroll(e):
                    v[u] = v[u] * T.float32(norm)
                    amax = T.max(amax, T.abs(v[u]))
                w = T.warp_reduce_max(amax)
                if tx % 32 == 0:
                    S[tokens * n + tx // 32] = w
                T.sync_threads()
                total = T.alloc_var("float32", init=S[tokens * n + slot * warps])
                for k in list(range(1, warps)):
                    total = T.max(total, S[tokens * n + slot * warps + k])
                scale = T.alloc_var("float32", init=_token_scale(total, bits, clip))
                rcp = T.alloc_var("float32", init=T.float32(1) / scale)
                if tok < m and i == 0:
                    XS[tok] = scale
                if stage_codes:
                    # Through an int8 tile in shared memory, then 16-byte stores of adjacent codes.
                    Q = T.alloc_shared((tokens * n,), "int8")
                    for u in T.unroll(e):
                        Q[base + u * e + i] = _quantize(v[u], scale, rcp, bits)
                    T.sync_threads()
                    if tok < m:
                        for c in T.unroll(e // 16):
                            for k in T.vectorized(16):
                                XQ[tok, (c * e + i) * 16 + k] = Q[base + (c * e + i) * 16 + k]
                elif tok < m:
                    for u in T.unroll(e):
                        XQ[tok, u * e + i] = _quantize(v[u], scale, rcp, bits)

        return main

    return build()


def hadamard_quant_square(n: int, bits: int, clip: float, target=None, rows: int | None = None,
                          stage_codes: bool = False):
    """Build (and cache) the two-pass quantizer for square rows (square_fits). Call it as
    kernel(X, XQ, XS): X float16 [m, n] is read, XQ int8 [m, n] and XS float32 [m] are written;
    the same contract as `hadamard_quant.hadamard_quant` with factors (n,) and no block.
    For the sweeps: rows (a block; default ROWS) and stage_codes (the codes through shared memory
    into 16-byte stores, where by default a warp stores 32 adjacent bytes at a time)."""
    return _hadamard_quant_square(int(n), int(bits), float(clip), target, rows, bool(stage_codes))
