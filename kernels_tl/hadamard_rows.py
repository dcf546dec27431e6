"""The row machinery of the online Hadamard quantizers (TileLang, Hopper), shared by the one-block
kernel (`kernels_tl.hadamard_quant`) and the persistent streaming one (`kernels_tl.hadamard_quant_stream`),
and in parts by the others: a row of n = nb blocks of f · p (a dense Paley factor f, a Sylvester
factor p) laid out over a block's threads (`_layout`), its load phase (the dense ±1 product and the
first butterfly bits in registers) and quantize phase (the last butterfly pass in registers, the
amax, the codes) as macros (`_row_transform`), and the strided butterfly passes through the swizzled
float32 row in shared memory between them (`_butterfly_pass`). Also the SwiGLU in torch's float16
arithmetic (`_swiglu_f16`: the gated quantizers and the gate_up GEMM's SwiGLU epilogue) and the
in-register butterfly (`_register_butterfly`: the fused RoPE + KV store).
"""

import math
from typing import NamedTuple

import tilelang.language as T

from kernels_tl.quantize import _block_allreduce, _quantize, _token_scale


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _swizzle(s):
    """Shared-memory address of row element s: the 16-byte chunk index within each 32-float line is
    XORed with the line index (mod 8). Passes whose threads read 32 contiguous floats then hit 8
    different chunks per 8-lane phase (conflict-free float4 loads); passes whose lanes read
    consecutive elements stay a permutation within one line (also conflict-free)."""
    return s ^ (((s >> 5) & 7) << 2)


def _swizzle_vec(s, width: int):
    """_swizzle(s) for s a multiple of width (1, 2 or 4), written so that the vectorizer can prove
    the alignment of `_swizzle_vec(s, width) + e` (it cannot see through the XOR)."""
    chunk = ((s >> 2) ^ ((s >> 5) & 7)) * 4
    return chunk if width == 4 else chunk + ((s & 3) >> (width // 2)) * width


@T.macro
def _swiglu_f16(gate, up, fast: bool = False):
    """torch's float16 F.silu(gate) * up, as float32: silu in float32 (expf, IEEE division) rounded
    to float16, then the product rounded to float16. fast: silu from the hardware's approximate
    exp and reciprocal (a few float32 ulps off, so ~1 in 10^4 silu values round to the neighbouring
    float16), ~5 instructions instead of ~30: at thousands of tokens the gated quantizer issues
    about half its instructions in this function."""
    g = T.Cast("float32", gate)
    if fast:
        sg = T.Cast("float16", g * T.fast_rcp(T.float32(1) + T.__exp(T.float32(0) - g)))
    else:
        sg = T.Cast("float16", g / (T.float32(1) + T.exp(T.float32(0) - g)))
    return T.Cast("float32", T.Cast("float16", T.Cast("float32", sg) * T.Cast("float32", up)))


def _signed_chain(terms):
    """Σ sign·value over (sign, value) pairs as one add/sub chain, starting from a positive term."""
    terms = sorted(terms, key=lambda term: term[0] < 0)
    acc = terms[0][1] if terms[0][0] > 0 else T.float32(0) - terms[0][1]
    for sign, value in terms[1:]:
        acc = acc + value if sign > 0 else acc - value
    return acc


@T.macro
def _quad_combos(x, comb, t, quads: int):
    """comb[t, j, k] = a ± b ± c ± d for the rows a..d = 4j..4j+3 of column t, bit 2 / 1 / 0 of k
    giving the sign of b / c / d: the 8 sign patterns up to the sign of a (14 adds per quad)."""
    for j in list(range(quads)):
        a, b, c, d = x[4 * j, t], x[4 * j + 1, t], x[4 * j + 2, t], x[4 * j + 3, t]
        for k in list(range(8)):
            ab = a - b if k & 4 else a + b
            abc = ab - c if k & 2 else ab + c
            comb[t, j, k] = abc - d if k & 1 else abc + d


def _quad_terms(A, i: int, quads: int):
    """Output i of x @ A as (sign, quad, pattern) terms over _quad_combos: one add per 4 inputs."""
    terms = []
    for j in range(quads):
        sa, sb, sc, sd = (int(A[4 * j + r, i]) for r in range(4))
        terms.append((sa, j, (4 if sb != sa else 0) | (2 if sc != sa else 0) | (1 if sd != sa else 0)))
    return terms


def _column_sum(x, rows, t):
    acc = x[rows[0], t]
    for r in rows[1:]:
        acc = acc + x[r, t]
    return acc


def _signed_sum(x, total, rows_plus, rows_all, t):
    """Σ_i' A[i', i]·x[i', t] for one column of a ±1 matrix, as 2·Σ₊ − Σ (or Σ − 2·Σ₋ when the
    column has more +1 than −1), Σ = total shared by all columns: about f/2 adds per output, not f."""
    rows_minus = [r for r in rows_all if r not in rows_plus]
    if not rows_minus:
        return total
    if not rows_plus:
        return T.float32(0) - total
    if len(rows_plus) <= len(rows_minus):
        return _column_sum(x, rows_plus, t) * T.float32(2) - total
    return total - _column_sum(x, rows_minus, t) * T.float32(2)


def _butterfly_plan(k: int, first_done: int, max_radix: int):
    """Passes of the 2^k Walsh–Hadamard butterfly over the last k index bits, after the phase that
    already did bits [0, first_done) in registers. Each pass is (stride_log2, radix_log2, lo): a thread
    takes 2^radix elements at stride 2^stride_log2 and runs the stages for relative bits [lo, radix).
    Strided groups (bits >= 5, at most max_radix bits per pass; lanes read consecutive float4s)
    come first; the last pass takes 32 contiguous elements (bits < 5: float4 loads, and the thread's
    quantized bytes are contiguous, so they leave in 16-byte stores). The stages act on different
    index bits, so they commute: any order gives the same transform."""
    passes = []
    b0 = 5
    while b0 < k:
        r = min(max_radix, k - b0)
        passes.append((b0, r, 0))
        b0 += r
    return passes + [(0, min(k, 5), first_done)]


@T.macro
def _register_butterfly(a, b, base, size: int, lo: int, hi: int):
    """In-register Walsh–Hadamard stages for bits [lo, hi) of a[base : base + size], ping-ponging
    between a and b (a fresh array per stage keeps every index static: registers, no spills).
    The result is in a if the number of stages is even, else in b."""
    for s in list(range(lo, hi)):
        src, dst = (a, b) if (s - lo) % 2 == 0 else (b, a)
        h = 1 << s
        for u in [u for u in range(size) if not u & h]:
            dst[base + u] = src[base + u] + src[base + u + h]
            dst[base + u + h] = src[base + u] - src[base + u + h]


class _Layout(NamedTuple):
    f: int          # the dense (Paley) factor, 1 if none
    p: int          # the Sylvester factor: the product of the power-of-two factors
    nb: int         # blocks of the block-diagonal fallback (1: one Hadamard over the whole row)
    cpt: int        # adjacent columns per thread in the load phase
    threads: int
    plan: list      # butterfly passes, see _butterfly_plan


def _layout(n: int, factors: tuple, block, threads=None, cols_per_thread=None, max_radix=None) -> _Layout:
    size = math.prod(factors)
    if block is None and n != size or block is not None and (block != size or n % size):
        raise ValueError(f"factors {list(factors)} (block {block}) do not fit a last dim of {n}")
    odd = [f for f in factors if not _is_pow2(f)]
    if len(odd) > 1 or (odd and factors[0] != odd[0]):
        # hadamard_factors gives (Paley order, 2^k): the kernel's row layout is [blocks, f, p].
        raise NotImplementedError(f"Hadamard factors {list(factors)}: expected [f, 2^k], [2^k] or [f]")
    f = odd[0] if odd else 1
    p = size // f                      # Sylvester factors multiply into one Sylvester matrix of order p
    nb = n // size
    # Columns per thread in the load phase: 8 (16-byte loads) without a dense factor; with one, the
    # f inputs of each column (and their quad sums) sit in registers: one column.
    cpt = min(p, cols_per_thread or (8 if f == 1 else 1))
    ncg = nb * p // cpt
    # Threads: up to 256; 128 without a dense factor while the last pass keeps one 32-float group
    # a thread (more would spill); strided passes of 3 bits (32 floats a thread). Measured on an
    # H200 at M = 2048 (bench/sweeps.py --hadamard, 2026-11-30): 4096 wide 18.5 µs against
    # 24.8 at 256 threads; the gated 14336-wide down_proj input 216 µs against 253 with 2 columns
    # a thread and 4-bit passes.
    cap = 128 if f == 1 and n <= 128 * 32 else 256
    threads = threads or min(cap, max(64, 1 << (ncg - 1).bit_length()))
    max_radix = max_radix or 3
    return _Layout(f, p, nb, cpt, threads, _butterfly_plan(p.bit_length() - 1, cpt.bit_length() - 1, max_radix))


class _RowTransform(NamedTuple):
    """The transform and quantization of one token row, as both Hadamard quantizers run it (this
    module's one-block kernel and hadamard_quant_stream's persistent one): build-time constants and
    the two macros around the butterfly passes."""
    rows: list
    quads: int
    group: int       # elements a thread holds per group in the last (contiguous) pass
    per_thread: int  # groups a thread holds in that pass
    load: object     # T.macro load(src, row, S, xin, tot, comb, ya, yb, tx): phase 1 into S
    quantize: object  # T.macro quantize(S, fa, fb, XQ, XS, row, tx): last pass, scale, codes


def _row_transform(n: int, lay: _Layout, bits: int, clip: float, gated: bool, fast_silu: bool) -> _RowTransform:
    f, p, nb, cpt, threads, plan = lay
    size = f * p
    cols = nb * p                      # columns of the [f, cols] view the dense f-product runs on
    ncg = cols // cpt
    warps = threads // 32
    A = None
    if f > 1:
        from kernels_tl.hadamard import _factor_pm1
        A = _factor_pm1(f)
    rows = list(range(f))
    # Dense factor: while the 2f quad sums of a thread's columns fit in registers (f·cpt <= 64) each
    # output is a chain of f/4 precomputed a ± b ± c ± d sums (f²/4 + 3.5f adds per column); the
    # 148-order factor uses 2·Σ₊ − Σ instead (about f²/2 adds).
    quads = f // 4 if 1 < f and f * cpt <= 64 and f % 4 == 0 else 0
    terms = [_quad_terms(A, i, quads) for i in rows] if quads else None
    plus = [[r for r in rows if A[r, i] > 0] for i in rows] if f > 1 and not quads else None
    norm = 1.0 / math.sqrt(size)
    stride, radix, lo = plan[-1]
    assert stride == 0  # the last pass is the contiguous one (see _butterfly_plan)
    group = 1 << radix
    ngroups = n // group
    per_thread = -(-ngroups // threads)
    store_vec = max(v for v in (1, 2, 4, 8, 16) if v <= group and n % v == 0)

    def x_index(s):
        """Row position of element s of the [f, nb, p]-ordered shared buffer ([nb, f, p] in X)."""
        if nb == 1 or f == 1:
            return s
        seg, j = s // p, s % p
        return ((seg % nb) * f + seg // nb) * p + j

    @T.macro
    def load(src, row, S, xin, tot, comb, ya, yb, tx):
        """Phase 1: each thread loads cpt adjacent columns (all f rows of them) of src[row], runs the
        dense ±1 product across rows (signs baked in at build time) and the butterfly stages inside
        its cpt columns, and stores to shared memory."""
        for kk in T.serial(-(-ncg // threads)):
            cg = kk * threads + tx
            if ncg % threads == 0 or cg < ncg:
                col0 = cg * cpt
                gbase = col0 if nb == 1 or f == 1 else col0 + (col0 // p) * ((f - 1) * p)
                for i in rows:
                    if gated:
                        for t in T.unroll(cpt):
                            xin[i, t] = _swiglu_f16(src[row, gbase + i * p + t], src[row, n + gbase + i * p + t],
                                                    fast_silu)
                    else:
                        for t in T.vectorized(cpt):
                            xin[i, t] = T.Cast("float32", src[row, gbase + i * p + t])
                for t in list(range(cpt)):
                    if quads:
                        _quad_combos(xin, comb, t, quads)
                    elif f > 1:
                        tot[t] = _column_sum(xin, rows, t)
                for i in rows:
                    for t in list(range(cpt)):
                        if f == 1:
                            ya[t] = xin[i, t]
                        elif quads:
                            ya[t] = _signed_chain([(sg, comb[t, j, k]) for sg, j, k in terms[i]])
                        else:
                            ya[t] = _signed_sum(xin, tot[t], plus[i], rows, t)
                    _register_butterfly(ya, yb, 0, cpt, 0, cpt.bit_length() - 1)
                    y = ya if (cpt.bit_length() - 1) % 2 == 0 else yb
                    for q in list(range(0, cpt, 4)):
                        for e in T.vectorized(min(cpt, 4)):
                            S[_swizzle_vec(i * cols + col0 + q, min(cpt, 4)) + e] = y[q + e]

    @T.macro
    def quantize(S, fa, fb, XQ, XS, row, tx):
        """The last butterfly pass in registers (fa, fb: per_thread · group floats), the block's
        amax, the token scale into XS[row] and the codes into XQ[row]."""
        amax = T.alloc_var("float32", init=0)
        for g in T.unroll(per_thread):
            gid = g * threads + tx
            if ngroups % threads == 0 or gid < ngroups:
                _move_group(S, fa, g * group, gid, stride, radix, False)
                _register_butterfly(fa, fb, g * group, group, lo, radix)
            else:
                for u in T.unroll(group):
                    fa[g * group + u] = T.float32(0)
                    fb[g * group + u] = T.float32(0)
        fin = fa if (radix - lo) % 2 == 0 else fb
        for u in T.unroll(per_thread * group):
            fin[u] = fin[u] * T.float32(norm)
            amax = T.max(amax, T.abs(fin[u]))
        scale = T.alloc_var("float32", init=_token_scale(_block_allreduce(amax, S, n, tx, warps, False),
                                                         bits, clip))
        rcp = T.alloc_var("float32", init=T.float32(1) / scale)
        if tx == 0:
            XS[row] = scale
        qv = T.alloc_local((group,), "int8")
        for g in T.unroll(per_thread):
            gid = g * threads + tx
            if ngroups % threads == 0 or gid < ngroups:
                # The last pass is the contiguous one: the group's bytes are adjacent in XQ.
                base = x_index(_group_base(gid, 0, radix))
                for u in T.unroll(group):
                    qv[u] = _quantize(fin[g * group + u], scale, rcp, bits)
                for q in list(range(0, group, store_vec)):
                    for e in T.vectorized(store_vec):
                        XQ[row, base + q + e] = qv[q + e]

    return _RowTransform(rows, quads, group, per_thread, load, quantize)


def _group_base(gid, stride: int, radix: int):
    """First element of butterfly group gid. Contiguous groups (stride 0) are 2^radix adjacent
    elements; strided groups are 4 adjacent columns (one float4) times 2^radix elements at
    2^stride apart: gid with `radix` zero bits inserted at bit stride - 2, times 4."""
    if stride == 0:
        return gid * (1 << radix)  # a product, not a shift: the vectorizer proves alignment from it
    low = stride - 2
    return ((gid >> low) << (stride + radix)) + (gid & ((1 << low) - 1)) * 4


def _group_size(stride: int, radix: int) -> int:
    return (1 << radix) * (1 if stride == 0 else 4)


@T.macro
def _move_group(S, local, off, gid, stride: int, radix: int, to_shared: bool):
    """Copy a butterfly group between the shared row S and local[off + ...] (strided groups: local
    index u·4 + column): into local, or back into S with to_shared."""
    base = _group_base(gid, stride, radix)
    if stride == 0:
        group = 1 << radix
        for q in list(range(0, group, 4)):
            for e in T.vectorized(min(group, 4)):
                if to_shared:
                    S[_swizzle_vec(base + q, min(group, 4)) + e] = local[off + q + e]
                else:
                    local[off + q + e] = S[_swizzle_vec(base + q, min(group, 4)) + e]
    else:
        for u in list(range(1 << radix)):
            for e in T.vectorized(4):
                if to_shared:
                    S[_swizzle_vec(base + (u << stride), 4) + e] = local[off + u * 4 + e]
                else:
                    local[off + u * 4 + e] = S[_swizzle_vec(base + (u << stride), 4) + e]


@T.macro
def _butterfly_pass(S, tx, threads: int, n: int, stride: int, radix: int, lo: int):
    """One in-place pass over the shared row: every group is loaded, transformed, stored back
    (groups are disjoint, so no synchronisation is needed inside a pass). Strided groups move
    float4s: 8 lanes read 8 different 16-byte chunks of one swizzled line, conflict-free."""
    size = _group_size(stride, radix)
    ngroups = n // size
    shift = 0 if stride == 0 else 2  # strided groups: the butterfly bits sit above the column bits
    a = T.alloc_local((size,), "float32")
    b = T.alloc_local((size,), "float32")
    for kk in T.serial(-(-ngroups // threads)):
        gid = kk * threads + tx
        if ngroups % threads == 0 or gid < ngroups:
            _move_group(S, a, 0, gid, stride, radix, False)
            _register_butterfly(a, b, 0, size, lo + shift, radix + shift)
            _move_group(S, a if (radix - lo) % 2 == 0 else b, 0, gid, stride, radix, True)
