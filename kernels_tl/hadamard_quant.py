"""Online Hadamard + per-token quantization (TileLang, Hopper): the o_proj and down_proj inputs.

`hadamard_quant`  computes `apply_hadamard` followed by `reference.quantize_act`: the online
                  Hadamard before o_proj (across heads) / down_proj (the intermediate size,
                  factor·2^k), fused with per-token quantization; the gated variant computes the
                  MLP's SwiGLU on load.

Memory bound like the norm (`kernels_tl.quantize`, whose rounding helpers it uses, so both round
exactly as the reference): one block per token row, the row in shared memory as float32. Only
the Hadamard's float32 summation order can differ from the reference. M is dynamic. The row's
layout, load and quantize phases and butterfly passes are `kernels_tl.hadamard_rows`'.
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.hadamard_rows import _butterfly_pass, _layout, _row_transform
from kernels_tl.pdl import wait_for_producers
from kernels_tl.quantize import _PASS_CONFIGS, _qmax
from kernels_tl.targets import SM90, TARGETS  # noqa: F401


@functools.lru_cache(maxsize=None)
def _hadamard_quant(n: int, factors: tuple, block, bits: int, clip: float, target, threads, cols_per_thread,
                    min_blocks, max_radix, gated: bool = False, fast_silu: bool = False):
    _qmax(bits)
    lay = _layout(n, factors, block, threads, cols_per_thread, max_radix)
    f, cpt, threads, plan = lay.f, lay.cpt, lay.threads, lay.plan
    warps = threads // 32
    # Resident threads per SM: 512 with a dense factor, 768 without, by capping registers (nvcc would
    # take up to 255 otherwise); not for the 148-order factor, whose 2·Σ₊ − Σ form needs its ~150
    # inputs in registers.
    min_blocks = min_blocks or (max(1, (768 if f == 1 else 512) // threads) if f <= 64 else 1)
    rt = _row_transform(n, lay, bits, clip, gated, fast_silu)

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, 2 * n if gated else n), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(m, threads=threads) as bx:
                if min_blocks > 1:
                    T.annotate_min_blocks_per_sm(min_blocks)
                wait_for_producers("hadamard_quant")
                tx = T.get_thread_binding()
                # The row in fp32 (swizzled, see _swizzle), then the block reduction's slots: one buffer,
                # so that nothing else is placed over the row while other warps may still read it.
                S = T.alloc_shared((n + warps,), "float32")
                xin = T.alloc_local((f, cpt), "float32")
                tot = T.alloc_local((cpt,), "float32")
                comb = T.alloc_local((cpt, max(rt.quads, 1), 8), "float32")
                ya = T.alloc_local((cpt,), "float32")
                yb = T.alloc_local((cpt,), "float32")
                rt.load(X, bx, S, xin, tot, comb, ya, yb, tx)
                T.sync_threads()
                # Butterfly passes over the p-long segments; the last one keeps its values in registers.
                for stride, radix, lo in plan[:-1]:
                    _butterfly_pass(S, tx, threads, n, stride, radix, lo)
                    T.sync_threads()
                fa = T.alloc_local((rt.per_thread * rt.group,), "float32")
                fb = T.alloc_local((rt.per_thread * rt.group,), "float32")
                rt.quantize(S, fa, fb, XQ, XS, bx, tx)

        return main

    return build()


def hadamard_quant(n: int, factors, block, bits: int, clip: float, target=None, threads=None,
                   cols_per_thread=None, min_blocks=None, max_radix=None, gated: bool = False,
                   fast_silu: bool = False):
    """Build (and cache) the fused online Hadamard + per-token quantization for one activation width.

    Call it as kernel(X, XQ, XS): X float16 [m, n] is read; XQ int8 [m, n] and XS float32 [m] are
    written, not allocated. Computes `apply_hadamard(x, factors, block)` in float32 (H orthonormal,
    block-diagonal over blocks of prod(factors) channels when `block` is set), then
    `reference.quantize_act`.

    One block per token, the row in shared memory as float32 (≤ 76 KB for n = 18944). The dense
    factor f (Paley order, ≤ 148) runs first, on the exact fp16 inputs, as signed sums with the
    signs baked in at build time; the 2^k Sylvester factor is a butterfly over register groups of
    32 floats (max_radix 3), one shared-memory round trip per pass (float4 accesses, swizzled, no bank
    conflicts); the last pass stays in registers for absmax + quantize + 16-byte int8 stores.
    threads, cols_per_thread (a power of two ≤ 8), min_blocks (per SM, caps registers) and
    max_radix (bits per strided butterfly pass) override the defaults, for tuning.

    gated: X is the MLP's float16 gate_up [m, 2n] (gate first) and the transform runs on
    silu(gate) * up, computed on load as torch computes it in float16 (each op rounded to float16):
    the SwiGLU's two elementwise kernels and its [m, n] intermediate disappear. fast_silu: silu
    from approximate exp / reciprocal (see _swiglu_f16; a variant for the sweeps, not the default).

    For a few tokens the dispatch (kernels_tl.hadamard_quant_dispatch) uses
    kernels_tl.hadamard_quant_cluster instead (the row split over a thread-block cluster), where
    the factors allow.
    """
    return _hadamard_quant(int(n), tuple(int(f) for f in factors), None if block is None else int(block),
                           int(bits), float(clip), target, threads, cols_per_thread, min_blocks, max_radix,
                           bool(gated), bool(fast_silu))
