"""Activation quantizers (TileLang, Hopper): the norm that produces the GEMM's int8 activations, and
the quantization helpers it shares with the Hadamard quantizer (`kernels_tl.hadamard_quant`).

`rmsnorm_quant`   computes `reference.rmsnorm_split_quant`: weightless RMSNorm of the widened
                  residual, the first r channels out as fp16, the other d quantized per token.

Memory bound: one block reads one token row once, keeps it on chip and writes int8 values
(unpacked int8 even for 4-bit sites: the GEMM consumes int8) and one float32 scale per token.
Rounding matches the reference bit for bit: the scale is clip·amax/qmax in float32 and
q = rint(x / scale) on the IEEE quotient (see _quantize; no --use_fast_math), so only a different
float summation order (the sum of squares) can move a value across a rounding boundary.
M (tokens) is dynamic: one compiled kernel serves every token count.

The code is written per thread (explicit thread index, register arrays, Python-unrolled loops)
rather than with tile ops, as is the Hadamard quantizer's, whose butterflies need that control.
"""

import functools
import os

import tilelang
import tilelang.language as T

from kernels_tl import l2_prefetch
from kernels_tl.l2_prefetch import PREFETCH_SRC, prefetch_share
from kernels_tl.pdl import wait_for_producers

from kernels_tl.targets import SM90, TARGETS  # noqa: F401


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits} (4 or 8)")
    return 7 if bits == 4 else 127


def _quantize(v, scale, rcp, bits: int):
    """int8 q = clamp(rint(v / scale), qmin, qmax), exactly reference.quantize_act's rounding.

    v / scale is the IEEE quotient, obtained from rcp = 1 / scale (one IEEE division per thread) by
    Markstein's correction: t = v·rcp is within an ulp, the FMA residual v − t·scale is exact, and
    t + residual·rcp rounds to the correctly rounded quotient (no underflow or overflow here:
    |v / scale| ≤ qmax / clip). Three instructions instead of the div.rn sequence per element, which
    made the quantizer epilogue the largest single cost; a plain v·rcp would round differently.
    """
    t = v * rcp
    quotient = T.fma(T.fma(T.float32(0) - t, scale, v), rcp, t)
    q = T.round(quotient)  # round half to even (CUDA rintf / nearbyintf)
    return T.Cast("int8", T.min(T.max(q, T.float32(-_qmax(bits) - 1)), T.float32(_qmax(bits))))


def _token_scale(amax, bits: int, clip: float):
    """clip·amax/qmax in float32 in the reference's order ((amax·clip)/qmax); zero rows get 1."""
    scale = amax * T.float32(clip) / T.float32(_qmax(bits))
    return T.if_then_else(scale == T.float32(0), T.float32(1), scale)


# The kernels place their own barriers: TileLang's automatic sync insertion cannot see that the
# threads of a butterfly pass touch disjoint (swizzled) addresses and would put a __syncthreads()
# between every two shared-memory stores.
# Every global access is in bounds by construction (guards where a thread has no work), so the
# per-element bounds checks TileLang would add are disabled too.
_PASS_CONFIGS = {"tl.disable_thread_storage_sync": True, "tl.disable_safe_memory_legalize": True}


@T.macro
def _block_allreduce(value, red, off: int, tx, warps: int, is_sum: bool):
    """Reduce a float32 over the block: shuffles within each warp, then every thread reads all warp
    results (red[off : off + warps], shared, used by no other reduction) in the same fixed order,
    so all threads hold the same value."""
    w = T.warp_reduce_sum(value) if is_sum else T.warp_reduce_max(value)
    if tx % 32 == 0:
        red[off + tx // 32] = w
    T.sync_threads()
    total = T.alloc_var("float32", init=red[off])
    for i in range(1, warps):  # compile-time trip count: unrolled by nvcc
        total = total + red[off + i] if is_sum else T.max(total, red[off + i])
    return total


# ---------------------------------------------------------------- RMSNorm + split + quantize

def rmsnorm_body(width: int, rank: int, d: int, bits: int, clip: float, eps: float, threads: int, add: str | None):
    """rmsnorm_quant's work on one token row, as a macro body(H, D, XO, XQ, XS, row, SX, WS) for a
    block of `threads` threads. add "float16": H[row] += D[row] first; add "splitk": H[row] +=
    float16(D[row] · SX[row] · WS / 16) first, D being a split-K GEMM's int32 sums (its epilogue,
    gemm_decode._decode_epilogue without outliers or bias, in the same float32 operations), and
    D[row] is zeroed for the next GEMM as the epilogue kernel would."""
    _qmax(bits)
    vec = 8
    nvec = width // vec
    per_thread = -(-nvec // threads)
    ragged = nvec % threads != 0
    warps = threads // 32

    @T.macro
    def body(H, D, XO, XQ, XS, bx, SX, WS):
        tx = T.get_thread_binding()
        xh = T.alloc_local((per_thread, vec), "float16")
        red = T.alloc_shared((2 * warps,), "float32")
        ss = T.alloc_var("float32", init=0)
        amax = T.alloc_var("float32", init=0)
        if add:
            # Every load of the row is issued before the first store: the stores (H, and the zeroed
            # sums) may alias the loads as far as the compiler knows (the PDL build drops
            # __restrict__), so loads after a store would wait for it, a memory round trip per vector.
            hv = T.alloc_local((per_thread, vec), "float32")
            dv = T.alloc_local((per_thread, vec), "int32" if add == "splitk" else "float16")
            hf = T.alloc_local((vec,), "float32")
            if add == "splitk":
                wv = T.alloc_local((per_thread, vec), "float16")
                token_scale = T.alloc_var("float32", init=SX[bx])
            for v in T.unroll(per_thread):
                col = (v * threads + tx) * vec
                if not ragged or col < width:
                    for e in T.vectorized(vec):
                        hv[v, e] = H[bx, col + e]
                    for e in T.vectorized(vec):
                        dv[v, e] = D[bx, col + e]
                    if add == "splitk":
                        for e in T.vectorized(vec):
                            wv[v, e] = WS[col + e]
        for v in T.unroll(per_thread):
            col = (v * threads + tx) * vec
            if not ragged or col < width:
                if add:
                    if add == "splitk":
                        for e in T.unroll(vec):
                            hf[e] = hv[v, e] + T.Cast("float32", T.Cast("float16", T.Cast("float32", dv[v, e]) * (
                                token_scale * T.Cast("float32", wv[v, e]) * T.float32(1.0 / 16))))
                        for e in T.vectorized(vec):
                            D[bx, col + e] = 0
                    else:
                        for e in T.vectorized(vec):
                            hf[e] = hv[v, e] + T.Cast("float32", dv[v, e])
                    for e in T.vectorized(vec):
                        H[bx, col + e] = hf[e]
                    for e in T.vectorized(vec):
                        xh[v, e] = T.Cast("float16", hf[e])
                else:
                    for e in T.vectorized(vec):
                        xh[v, e] = T.Cast("float16", H[bx, col + e])
            else:
                for e in T.vectorized(vec):
                    xh[v, e] = T.float16(0)
            for e in T.unroll(vec):
                x = T.Cast("float32", xh[v, e])
                ss += x * x
                if rank == 0 or col >= rank:
                    amax = T.max(amax, T.abs(x))
        total = _block_allreduce(ss, red, 0, tx, warps, True)
        amax_raw = _block_allreduce(amax, red, warps, tx, warps, False)
        # The widened stream carries the original stream's norm: divide by d, not rank + d.
        inv = T.alloc_var("float32", init=T.rsqrt(total / T.float32(d) + T.float32(eps)))
        scale = T.alloc_var("float32", init=_token_scale(amax_raw * inv, bits, clip))
        rcp = T.alloc_var("float32", init=T.float32(1) / scale)
        qv = T.alloc_local((vec,), "int8")
        if tx == 0:
            XS[bx] = scale
        for v in T.unroll(per_thread):
            col = (v * threads + tx) * vec
            # rank is a multiple of 16: a vector is entirely outlier or entirely quantized.
            if rank > 0 and col < rank:
                for e in T.vectorized(vec):
                    XO[bx, col + e] = T.Cast("float16", T.Cast("float32", xh[v, e]) * inv)
            elif not ragged or col < width:
                for e in T.unroll(vec):
                    qv[e] = _quantize(T.Cast("float32", xh[v, e]) * inv, scale, rcp, bits)
                for e in T.vectorized(vec):
                    XQ[bx, col - rank + e] = qv[e]

    return body


@functools.lru_cache(maxsize=None)
def rmsnorm_quant(width: int, rank: int, d: int, bits: int, clip: float, eps: float, target=None,
                  threads=None, residual: str = "float16", prefetch_blocks: int = 0):
    """Build (and cache) the fused norm for one residual width (= rank + d).

    residual "float16": call it as kernel(H, XO, XQ, XS): H float16 [m, rank + d] is read.
    residual "float32": the same with H float32, rounded to float16 on load (the numerics' norm
    input), so the model's float32 residual needs no separate cast kernel.
    residual "add": kernel(H, D, XO, XQ, XS): H float32 [m, rank + d] += D float16 in place (the
    residual add of the branch before it), then the norm of float16(H) as above: one pass over
    the row instead of an add kernel, a cast kernel and the norm.
    residual "splitk": kernel(H, ACC, SX, WS, XO, XQ, XS): the same add with the branch still the
    int32 sums ACC [m, rank + d] of a split-K GEMM (no outliers, no bias), its token scales SX
    float32 [m] and weight scales WS float16 [rank + d]: the GEMM's epilogue rides in the norm's
    pass (gemm_dispatch.SplitKSums), one launch instead of two; ACC is left zero.
    XO float16 [m, max(rank, 16)] (columns >= rank untouched), XQ int8 [m, d] and XS float32 [m]
    are written, not allocated.
    prefetch_blocks > 0 (residual "add" or "splitk", the decode steps' modes): the kernel takes one
    more argument, PF uint8 [pn], and runs that many more blocks, which ask for PF's bytes in L2
    (kernels_tl.l2_prefetch: the next GEMM's packed weights) and write nothing.

    One block per token: each thread loads 16-byte vectors of 8 halves (interleaved over threads, so
    a warp reads 512 contiguous bytes), keeps them in registers, and one block reduction gives both
    the sum of squares (over all rank + d channels) and max|x| (over the d quantized ones): the
    normalized amax is amax·rsqrt(...) exactly, since rounding x·inv is monotonic in |x|.
    """
    assert width == rank + d and rank % 16 == 0 and d % 8 == 0, (width, rank, d)
    assert residual in ("float16", "float32", "add", "splitk"), residual
    # Enough blocks per SM to keep ~128 KB of loads in flight: at most 5 vectors per thread.
    threads = threads or next((t for t in (128, 256, 512) if (width // 8) <= 5 * t), 1024)
    r = max(rank, 16)  # a zero-width outlier output still needs a legal tensor; it is not written
    in_dtype = "float16" if residual == "float16" else "float32"
    add = {"add": "float16", "splitk": "splitk"}.get(residual)
    body = rmsnorm_body(width, rank, d, bits, clip, eps, threads, add)
    pfb = prefetch_blocks
    assert pfb == 0 or add, "the L2 prefetch rides in the fused-add modes (decode steps)"

    @T.macro
    def row_or_prefetch(H, D, XO, XQ, XS, SX, WS, PF, pn, m, bx):
        """With prefetch blocks: the norm's row in blocks below m, the prefetch pieces past it."""
        wait_for_producers("norm")
        T.import_source(PREFETCH_SRC)
        if bx < m:
            body(H, D, XO, XQ, XS, bx, SX, WS)
        else:
            prefetch_share(PF, pn, bx - m, pfb, threads)

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")
        pn = T.dynamic("pn")

        if add == "splitk" and pfb:
            @T.prim_func
            def main(
                H: T.Tensor((m, width), "float32"),
                ACC: T.Tensor((m, width), "int32"),
                SX: T.Tensor((m,), "float32"),
                WS: T.Tensor((width,), "float16"),
                XO: T.Tensor((m, r), "float16"),
                XQ: T.Tensor((m, d), "int8"),
                XS: T.Tensor((m,), "float32"),
                PF: T.Tensor((pn,), "uint8"),
            ):
                with T.Kernel(m + pfb, threads=threads) as bx:
                    row_or_prefetch(H, ACC, XO, XQ, XS, SX, WS, PF, pn, m, bx)
        elif add and pfb:
            @T.prim_func
            def main(
                H: T.Tensor((m, width), "float32"),
                D: T.Tensor((m, width), "float16"),
                XO: T.Tensor((m, r), "float16"),
                XQ: T.Tensor((m, d), "int8"),
                XS: T.Tensor((m,), "float32"),
                PF: T.Tensor((pn,), "uint8"),
            ):
                with T.Kernel(m + pfb, threads=threads) as bx:
                    row_or_prefetch(H, D, XO, XQ, XS, None, None, PF, pn, m, bx)
        elif add == "splitk":
            @T.prim_func
            def main(
                H: T.Tensor((m, width), "float32"),
                ACC: T.Tensor((m, width), "int32"),
                SX: T.Tensor((m,), "float32"),
                WS: T.Tensor((width,), "float16"),
                XO: T.Tensor((m, r), "float16"),
                XQ: T.Tensor((m, d), "int8"),
                XS: T.Tensor((m,), "float32"),
            ):
                with T.Kernel(m, threads=threads) as bx:
                    wait_for_producers("norm")
                    body(H, ACC, XO, XQ, XS, bx, SX, WS)
        elif add:
            @T.prim_func
            def main(
                H: T.Tensor((m, width), "float32"),
                D: T.Tensor((m, width), "float16"),
                XO: T.Tensor((m, r), "float16"),
                XQ: T.Tensor((m, d), "int8"),
                XS: T.Tensor((m,), "float32"),
            ):
                with T.Kernel(m, threads=threads) as bx:
                    wait_for_producers("norm")
                    body(H, D, XO, XQ, XS, bx, None, None)
        else:
            @T.prim_func
            def main(
                H: T.Tensor((m, width), in_dtype),
                XO: T.Tensor((m, r), "float16"),
                XQ: T.Tensor((m, d), "int8"),
                XS: T.Tensor((m,), "float32"),
            ):
                with T.Kernel(m, threads=threads) as bx:
                    wait_for_producers("norm")
                    body(H, H, XO, XQ, XS, bx, None, None)  # D is never read without the add

        return main

    return build()


# ---------------------------------------------------------------- dispatch entry point

# Threads a block for rows of at most DECODE_TOKENS tokens (decode steps): one block a token there, so
# the width rule of rmsnorm_quant (enough loads in flight across many blocks a SM) does not apply and
# a row's latency (its loads, two block reductions, the quantize) is the kernel's time. 512 threads
# take a Llama-3-8B row (4160 wide, 520 vectors of 8) in about one 16-byte vector a thread: 2.31
# against 3.89 µs a call at 1 token with the residual add, 2.82 against 3.08 with split-K sums
# (bench/sweeps.py --norm-threads); the decode step's quantizers 0.41 against 0.50 ms of device
# time at batch 1 (docs/results.md, 2026-12-03). QUAD_NORM_DECODE_THREADS=0: the width rule at every M.
DECODE_TOKENS = 64
DECODE_THREADS = int(os.environ.get("QUAD_NORM_DECODE_THREADS", "512"))


def norm_threads(m: int) -> int | None:
    """Threads a block of the norm for m tokens: DECODE_THREADS at decode sizes, else None (the width rule)."""
    return DECODE_THREADS if 0 < m <= DECODE_TOKENS and DECODE_THREADS else None


def prefetch_blocks(m: int, mode: str, device=None) -> int:
    """Extra blocks of a norm call that asks for the next GEMM's weights in L2 (kernels_tl.l2_prefetch,
    site "norm"): at decode sizes, in the fused-add modes, with the switch on; else 0."""
    if not (l2_prefetch.enabled("norm", m) and mode in ("add", "splitk")):
        return 0
    return l2_prefetch.prefetch_blocks(device)


def rmsnorm_quant_op(h, rank: int, d: int, eps: float, bits: int, clip: float, residual=None, prefetch=None):
    """(x_out float16 [.., rank], x_q int8 [.., d], x_scale float32 [.., 1]) of the widened residual h
    (float16, or float32: rounded to float16 on load). With `residual` (float16, h's shape; h float32
    and contiguous) h += residual in place first, in the same pass; residual may also be a split-K
    GEMM's sums before their epilogue (gemm_dispatch.SplitKSums), which the pass applies.
    prefetch: the next GEMM's packed weights, whose first bytes the call may ask for in L2
    (prefetch_blocks); the outputs are the same either way."""
    import torch

    lead = h.shape[:-1]
    splitk = residual is not None and not isinstance(residual, torch.Tensor)
    if residual is not None:
        assert h.dtype == torch.float32 and h.is_contiguous(), "the fused add updates a contiguous float32 h"
        h2, mode = h.view(-1, h.shape[-1]), "splitk" if splitk else "add"
        if splitk:
            assert residual.acc.shape == h2.shape, (residual.acc.shape, h2.shape)
    elif h.dtype == torch.float32:
        h2, mode = h.reshape(-1, h.shape[-1]).contiguous(), "float32"
    else:
        h2, mode = h.reshape(-1, h.shape[-1]).to(torch.float16).contiguous(), "float16"
    m = h2.shape[0]
    blocks = prefetch_blocks(m, mode, h.device) if prefetch is not None else 0
    pf = l2_prefetch.prefetch_bytes(prefetch) if blocks else None
    blocks = blocks if pf is not None else 0
    kernel = rmsnorm_quant(rank + d, rank, d, bits, float(clip), float(eps), threads=norm_threads(m), residual=mode,
                           prefetch_blocks=blocks)
    extra = (pf,) if blocks else ()
    x_out = torch.empty(m, max(rank, 16), dtype=torch.float16, device=h.device)
    x_q = torch.empty(m, d, dtype=torch.int8, device=h.device)
    x_scale = torch.empty(m, dtype=torch.float32, device=h.device)
    if m:
        if splitk:
            kernel(h2, residual.acc, residual.x_scale, residual.w_scale, x_out, x_q, x_scale, *extra)
        elif residual is not None:
            kernel(h2, residual.reshape(m, -1).to(torch.float16).contiguous(), x_out, x_q, x_scale, *extra)
        else:
            kernel(h2, x_out, x_q, x_scale)
    return x_out[:, :rank].reshape(*lead, rank), x_q.reshape(*lead, d), x_scale.reshape(*lead, 1)
