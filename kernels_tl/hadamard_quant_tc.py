"""Online Hadamard + per-token quantization on the tensor cores: long prefills of wide rows.

The scalar kernels (`hadamard_quant`, `hadamard_quant_cluster`) spend ~100 instructions an element
on the dense f-point factor and the butterflies: the gated 14336-wide down_proj input of a
Llama-3-8B prefill ran at ~1 TB/s, 140 µs a layer at 2048 tokens, a seventh of the prefill. Here
the row, as X [f, p] (element i·p + j, H = A_f ⊗ H_p), is transformed by three small float16
matrix products on wgmma, one token a block:

    1. Z1 [j, i'] = Σ_i X[i, j] · A[i, i']                       (K = f, padded to 32)
    2. W [(j1, i'), j2'] = Σ_j2 Z1[(j1, j2), i'] · H32[j2, j2']    (K = 32; j = j1·32 + j2)
    3. Y [(j2', i'), j1'] = Σ_j1 W[(j1, i'), j2'] · H_q[j1, j1']    (K = q = p / 32; H_p = H_q ⊗ H_32)

with ±1 matrices (exact in float16) and float32 accumulation. The products' inputs must be float16:
X is (the float16 SwiGLU of the gated variant, or the float16 input), and each float32 intermediate
enters the next product as two float16 terms, hi = fp16(z) and lo = fp16(z − hi), so it carries 22
of float32's 24 bits. Before that split the intermediate is multiplied by a power of two chosen from
the token's max|x| (exact), so that it neither overflows float16 nor loses lo's bits to its
subnormals. The output, Y · 2^-e / sqrt(n), is then quantized exactly as the reference's
quantize_act (kernels_tl.quantize's scale and rounding helpers). Only the float32 summation order
differs from the reference (`apply_hadamard`), as in the scalar kernels.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.hadamard_quant import _is_pow2, _swiglu_f16
from kernels_tl.quantize import _block_allreduce, _qmax, _quantize, _token_scale
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

THREADS = 256  # two warpgroups: every product splits its M rows between them
DENSE_PAD = 32  # the dense factor's K and N, padded
INNER = 32  # H_p = H_q ⊗ H_INNER
ROW_PAD = 512  # p, the power-of-two factor the kernel takes


def tc_layout(n: int, factors: tuple, block):
    """(f, p) of a row the tensor-core kernel takes, or None: one Hadamard over the whole row with
    factors [f, 512], f a dense factor of 4 to 32 (Llama-3's and Mistral's 14336 = 28 · 512). The
    products' fragments are sized for p = 512: 64 float32 registers a thread each."""
    if block is not None or math.prod(factors) != n:
        return None
    odd = [x for x in factors if not _is_pow2(x)]
    if len(odd) > 1 or (odd and factors[0] != odd[0]):
        return None
    f = odd[0] if odd else 1
    p = n // f
    if not 4 <= f <= DENSE_PAD or p != ROW_PAD:
        return None
    return f, p


@functools.lru_cache(maxsize=None)
def dense_factor(f: int, device) -> "torch.Tensor":  # noqa: F821
    """The ±1 dense factor A_f as float16 [32, 32], zero outside [f, f] (the kernel's extra operand;
    identity-like [1] for f = 1). Built once per device."""
    import torch

    from kernels_tl.hadamard import _factor_pm1
    a = torch.zeros(DENSE_PAD, DENSE_PAD, dtype=torch.float16)
    a[:f, :f] = _factor_pm1(f).to(torch.float16) if f > 1 else 1
    return a.to(device)


WARPS = THREADS // 32


@T.macro
def _fragment_max(acc, rowmax, rowmax_s, red, off: int, tx, rows: int):
    """max |acc| over a whole [rows, cols] fragment, the same value in every thread: per row (the
    fragment's own reduction), then the rows through shared memory and a block reduction."""
    T.reduce_absmax(acc, rowmax, dim=1)
    T.copy(rowmax, rowmax_s)
    local = T.alloc_var("float32", init=rowmax_s[tx])
    for k in T.serial(1, rows // THREADS):
        local = T.max(local, rowmax_s[tx + k * THREADS])
    return _block_allreduce(local, red, off, tx, WARPS, False)


def _pm1(a, b, order: int):
    """Sylvester H[a, b] = (-1)^popcount(a & b) as float16, a, b < order (a power of two)."""
    x = a & b
    parity = x
    for k in range(1, order.bit_length() - 1):
        parity = parity ^ (x >> k)
    return T.if_then_else(parity % 2 == 0, T.float16(1), T.float16(-1))


@functools.lru_cache(maxsize=None)
def hadamard_quant_tc(n: int, factors: tuple, bits: int, clip: float, gated: bool = False, fast_silu: bool = False,
                      min_blocks: int = 2, target=None):
    """kernel(x, a, x_q, x_scale): x float16 [M, n] (gated: gate_up [M, 2n], silu(gate) * up in
    torch's float16 arithmetic, fast_silu as hadamard_quant's), a = dense_factor(f, device), x_q
    int8 [M, n], x_scale float32 [M]; quantize_act(apply_hadamard(x, factors)) as the scalar
    kernels compute it. One block of 256 threads a token; M is dynamic. min_blocks: blocks a SM
    the registers are capped for."""
    _qmax(bits)
    layout = tc_layout(n, factors, None)
    if layout is None:
        raise NotImplementedError(f"Hadamard factors {list(factors)} of {n}: no tensor-core layout")
    f, p = layout
    q = p // INNER  # the outer Sylvester factor's order
    rows2 = q * DENSE_PAD  # M of product 2: (j1, i')
    rows3 = INNER * DENSE_PAD  # M of product 3: (j2', i')
    norm = 1.0 / math.sqrt(n)
    fp = T.GemmWarpPolicy.FullRow

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, 2 * n if gated else n), "float16"),
            AF: T.Tensor((DENSE_PAD, DENSE_PAD), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(m, threads=THREADS) as tok:
                # min_blocks 2: two blocks a SM (~70 KB of shared memory each, 128 registers a
                # thread, ~100 bytes spilled), so one block's loads and barriers overlap the other's
                # products; 1: 156 registers, no spills.
                if min_blocks > 1:
                    T.annotate_min_blocks_per_sm(min_blocks)
                a_s = T.alloc_shared((DENSE_PAD, DENSE_PAD), "float16")
                h_inner = T.alloc_shared((INNER, INNER), "float16")
                h_outer = T.alloc_shared((q, q), "float16")
                x_s = T.alloc_shared((DENSE_PAD, p), "float16")
                z_hi = T.alloc_shared((rows2, INNER), "float16")
                z_lo = T.alloc_shared((rows2, INNER), "float16")
                w_hi = T.alloc_shared((rows3, q), "float16")
                w_lo = T.alloc_shared((rows3, q), "float16")
                q_s = T.alloc_shared((DENSE_PAD, p), "int8")
                acc1 = T.alloc_fragment((p, DENSE_PAD), "float32")
                acc2 = T.alloc_fragment((rows2, INNER), "float32")
                acc3 = T.alloc_fragment((rows3, q), "float32")
                zmax = T.alloc_fragment((p,), "float32")
                ymax = T.alloc_fragment((rows3,), "float32")
                zmax_s = T.alloc_shared((p,), "float32")
                ymax_s = T.alloc_shared((rows3,), "float32")
                red = T.alloc_shared((2 * WARPS,), "float32")
                tx = T.get_thread_binding()

                T.copy(AF, a_s)
                for a, b in T.Parallel(INNER, INNER):
                    h_inner[a, b] = _pm1(a, b, INNER)
                for a, b in T.Parallel(q, q):
                    h_outer[a, b] = _pm1(a, b, q)
                for i, j in T.Parallel(f, p):
                    if gated:
                        x_s[i, j] = T.Cast("float16", _swiglu_f16(X[tok, i * p + j], X[tok, n + i * p + j], fast_silu))
                    else:
                        x_s[i, j] = X[tok, i * p + j]
                for i, j in T.Parallel(DENSE_PAD - f, p):
                    x_s[f + i, j] = T.float16(0)
                T.gemm(x_s, a_s, acc1, transpose_A=True, clear_accum=True, policy=fp)

                # The power of two that puts max|Z1| in [2^10, 2^11): every float16 term below is
                # then at most 2^11 in magnitude, and lo's bits stay clear of the subnormals.
                zmax_all = _fragment_max(acc1, zmax, zmax_s, red, 0, tx, p)
                up = T.alloc_var("float32", init=T.if_then_else(
                    zmax_all > T.float32(0), T.exp2(T.float32(10) - T.floor(T.log2(zmax_all))), T.float32(1)))
                for j, c in T.Parallel(p, DENSE_PAD):
                    z_hi[(j // INNER) * DENSE_PAD + c, j % INNER] = T.Cast("float16", acc1[j, c] * up)
                    z_lo[(j // INNER) * DENSE_PAD + c, j % INNER] = T.Cast(
                        "float16", acc1[j, c] * up - T.Cast("float32", T.Cast("float16", acc1[j, c] * up)))
                T.gemm(z_hi, h_inner, acc2, clear_accum=True, policy=fp)
                T.gemm(z_lo, h_inner, acc2, policy=fp)
                # W is a sum of 32 such terms: 1/32 keeps its float16 terms under 2^11 too.
                for r, c in T.Parallel(rows2, INNER):
                    w_hi[c * DENSE_PAD + r % DENSE_PAD, r // DENSE_PAD] = T.Cast(
                        "float16", acc2[r, c] * T.float32(1.0 / INNER))
                    w_lo[c * DENSE_PAD + r % DENSE_PAD, r // DENSE_PAD] = T.Cast(
                        "float16", acc2[r, c] * T.float32(1.0 / INNER)
                        - T.Cast("float32", T.Cast("float16", acc2[r, c] * T.float32(1.0 / INNER))))
                T.gemm(w_hi, h_outer, acc3, clear_accum=True, policy=fp)
                T.gemm(w_lo, h_outer, acc3, policy=fp)

                # y = acc3 · 32 / (up · sqrt(n)); the token's scale from max|y|, as the reference
                down = T.alloc_var("float32", init=T.float32(INNER * norm) / up)
                ymax_all = _fragment_max(acc3, ymax, ymax_s, red, WARPS, tx, rows3)
                scale = T.alloc_var("float32", init=_token_scale(ymax_all * down, bits, clip))
                rcp = T.alloc_var("float32", init=T.float32(1) / scale)
                for r, c in T.Parallel(rows3, q):
                    q_s[r % DENSE_PAD, c * INNER + r // DENSE_PAD] = _quantize(acc3[r, c] * down, scale, rcp, bits)
                for i, j in T.Parallel(f, p):
                    XQ[tok, i * p + j] = q_s[i, j]
                if tx == 0:
                    XS[tok] = scale

        return main

    return build()
