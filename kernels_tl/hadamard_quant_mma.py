"""The gated online Hadamard + per-token quantization of long prefills with the dense factor on the
tensor cores: the down_proj input of Llama-3-8B (14336 = 28 · 512), silu(gate) · up in float16,
then H_28 ⊗ H_512, then int8 / int4 codes and one scale a token.

`hadamard_quant_stream` computes the 28-point dense factor as signed float32 sums: about 10 adds an
element, and with the SwiGLU and the stores around it 33 of the kernel's 59 instructions an element
(Nsight Compute, 2048 tokens on an H200, 2026-12-03: 85 µs, 62% of issue slots busy, 1.6 TB/s).
Its inputs are exact float16 values (the SwiGLU's float16 product), so the dense factor is a
float16 matrix product with float32 accumulation: mma.sync m16n8k16 with the ±1 factor (zero-padded
to 32 x 32) as the B operand, the row's [28, 512] view as the A operand (ldmatrix.trans from a
swizzled float16 copy), one instruction for 2048 multiply-adds.

A row, in a block of 8 warps (persistent blocks and the next row's cp.async as in
hadamard_quant_stream):
1. SwiGLU, 16 bytes a thread at a time, from the input row R into P (float16, [28, 512], 16-byte
   chunks XOR-swizzled by row so that ldmatrix's 8 rows hit 8 bank groups). P lies in the float32
   row buffer S, which is free until step 3. R is then free: the next row's copy starts.
2. Warp w multiplies columns w·8 + 64·j + 256·h + (0..7), j < 4, h < 2: the thread's fragments
   hold 8 columns that differ in column bits 6, 7 and 8, whose butterfly stages run in registers.
3. The products go to S (float32, position s = o·512 + column, swizzled by `_swizzle`).
4. Column bits 0-5: each of n / 64 threads loads 64 adjacent positions, runs the 6 stages in
   registers, and after the block's amax writes its 64 codes with four 16-byte stores. No strided
   shared-memory pass, no barrier between the stages.

The float32 summation order differs from the scalar kernels' (the tensor cores' accumulation, the
butterfly stages in another order), so codes agree with the reference to the quantizer tolerance,
as theirs do; scales to float rounding.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.hadamard_rows import _layout
from kernels_tl.hadamard_quant_stream import _CP_ASYNC_SRC, _copy_row, blocks_per_sm, stream_fits
from kernels_tl.pdl import wait_for_producers
from kernels_tl.quantize import _PASS_CONFIGS, _block_allreduce, _qmax, _token_scale
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

COLS = 512        # the Sylvester factor this layout is written for: 8 warps x 4 x 2 x 8 columns
THREADS = 256


def _swizzle(s: int) -> int:
    """Where position s of the float32 row lies in S: bits 2-4 (the 16-byte chunk in a 32-float
    line) XORed with bits 6-8 and with bits 10-11 moved to 3-4. The last pass's 8 lanes of a
    quarter-warp read the same chunk of 64-float groups 64 apart (bits 6-8 differ), and an mma
    fragment's store has lanes that differ in bits 0-2 (g) and 10-11 (o = 8nt + 2t + e): both hit
    32 different banks. The kernel adds the thread-independent bits as constants (`sb`, `lm`);
    tests/test_quantize_build.py holds its hoisted forms to this definition."""
    return s ^ (((s >> 6) & 7) << 2) ^ (((s >> 10) & 3) << 3)


def _code(x, nscale, rcp, bits: int):
    """quantize.py's _quantize with its float rounding and clamp as one float-to-int conversion
    (cvt.rni: round half to even) and an integer clamp; the residual's FMA takes -scale."""
    t = x * rcp
    quotient = T.fma(T.fma(t, nscale, x), rcp, t)
    q = T.call_extern("int32", "__float2int_rn", quotient)
    return T.Cast("int8", T.min(T.max(q, -_qmax(bits) - 1), _qmax(bits)))


_SRC = r"""
#include <cuda_fp16.h>

// tl::fast_rcp's instruction (this source precedes TileLang's headers).
__device__ __forceinline__ float quad_rcp_approx(float x) {
  float r;
  asm volatile("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// torch's float16 F.silu(gate) * up for 8 elements: silu in float32 from the approximate exp and
// reciprocal (hadamard_rows._swiglu_f16 with fast), rounded to float16, then the float16 product.
// The product of two float16 values is exact in float32, so __hmul2's correctly rounded float16
// product equals the float32 product rounded to float16 (what torch computes).
__device__ __forceinline__ void quad_swiglu8(void* dst, const void* gate, const void* up) {
  const uint4 g = *reinterpret_cast<const uint4*>(gate);
  const uint4 u = *reinterpret_cast<const uint4*>(up);
  const unsigned gw[4] = {g.x, g.y, g.z, g.w};
  const unsigned uw[4] = {u.x, u.y, u.z, u.w};
  unsigned o[4];
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 gf = __half22float2(*reinterpret_cast<const half2*>(&gw[i]));
    const half2 sg = __floats2half2_rn(gf.x * quad_rcp_approx(1.0f + __expf(0.0f - gf.x)),
                                       gf.y * quad_rcp_approx(1.0f + __expf(0.0f - gf.y)));
    const half2 p = __hmul2(sg, *reinterpret_cast<const half2*>(&uw[i]));
    o[i] = *reinterpret_cast<const unsigned*>(&p);
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(o[0], o[1], o[2], o[3]);
}

// Four 8x8 float16 matrices, transposed, into an mma A fragment (four 32-bit registers).
__device__ __forceinline__ void quad_ldsm_x4_trans(void* frag, const void* row) {
  unsigned* r = reinterpret_cast<unsigned*>(frag);
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// The thread's B fragments of the zero-padded ±1 factor for n-tile nt: 2 k-tiles x 4 float16, one
// 16-byte load (an L1 hit after the first row), so that only one n-tile's fragments are live.
__device__ __forceinline__ void quad_dense_bfrag(void* frag, int lane, int nt) {
  *reinterpret_cast<uint4*>(frag) = __ldg(reinterpret_cast<const uint4*>(quad_dense_b + lane * 32 + nt * 8));
}
"""


def _bfrag_table(f: int) -> str:
    """quad_dense_b: for each lane (g = lane / 4, t = lane % 4), n-tile nt < 4 and k-tile kt < 2, the
    m16n8k16 B fragment (k = 16kt + 2t, 2t + 1, 2t + 8, 2t + 9; n = 8nt + g) of B[k, n] = A[k, n],
    A the ±1 factor (output n = Σ_k A[k, n]·x[k], as hadamard_quant's load phase), zero past f."""
    from kernels_tl.hadamard import _factor_pm1
    a = _factor_pm1(f)
    bits = {1.0: 0x3C00, -1.0: 0xBC00}
    words = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for nt in range(4):
            for kt in range(2):
                n = 8 * nt + g
                for k in (16 * kt + 2 * t, 16 * kt + 2 * t + 1, 16 * kt + 2 * t + 8, 16 * kt + 2 * t + 9):
                    words.append(bits[float(a[k, n])] if k < f and n < f else 0)
    body = ", ".join(f"0x{w:04x}" for w in words)
    return f"__device__ __align__(16) const unsigned short quad_dense_b[{len(words)}] = {{{body}}};\n"


def mma_fits(n: int, factors, block, gated: bool) -> bool:
    """Rows this kernel is for: gated rows the stream kernel takes (one Hadamard over the row, 2
    blocks a SM with its shared memory: R and S) whose dense factor has 24 to 32 points (two
    k-tiles; the padding rows f .. 31 read rows 8 lower, which must be rows of the factor) times 512."""
    if not gated or block is not None:
        return False
    try:
        lay = _layout(n, tuple(factors), None)
    except (ValueError, NotImplementedError):
        return False
    return 24 <= lay.f <= 32 and lay.p == COLS and lay.threads == THREADS and stream_fits(n, factors, None, True)


@functools.lru_cache(maxsize=None)
def _hadamard_quant_mma(n: int, factors: tuple, bits: int, clip: float, target, blocks: int):
    _qmax(bits)
    assert mma_fits(n, factors, None, True), (n, factors)
    lay = _layout(n, factors, None)
    f = lay.f
    warps = THREADS // 32
    resident = blocks_per_sm(n, factors, None, True)
    src = _CP_ASYNC_SRC + _bfrag_table(f) + _SRC
    chunks = n // 8  # 16-byte SwiGLU chunks of the row
    groups = n // 64  # the last pass's threads
    norm = 1.0 / math.sqrt(n)

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, 2 * n), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(blocks, threads=THREADS) as bx:
                T.import_source(src)
                T.annotate_min_blocks_per_sm(resident)
                wait_for_producers("hadamard_quant")
                tx = T.get_thread_binding()
                warp, lane = tx // 32, tx % 32
                g, t = lane // 4, lane % 4
                R = T.alloc_shared((1, 2 * n), "float16")  # the gated input row, filled by cp.async
                # The row in float32 (swizzled), then reduction slots; first the float16 SwiGLU
                # product P, addressed through the helpers (bytes [0, 2n)).
                S = T.alloc_shared((n + warps,), "float32")
                bf = T.alloc_local((8,), "float16")
                af = T.alloc_local((64,), "float16")
                acc = T.alloc_local((16,), "float32")
                v = T.alloc_local((64,), "float32")
                qv = T.alloc_local((16,), "int8")
                tmp = T.alloc_local((1,), "float32")
                amax = T.alloc_local((1,), "float32")
                # Addresses that depend on the thread only, so that the row loop adds constants or
                # XORs a constant in: the SwiGLU's P chunk, the ldmatrix row by k-tile, the S
                # stores (see _swizzle: s = (t·1024 + w·8 + g) + constant bits), the last pass's XOR.
                lb = T.alloc_local((2,), "int32")
                pc = (tx % 64) ^ (tx // 64)
                sb = (t * 1024 + warp * 8 + g) ^ (t * 8)
                for kt in T.unroll(2):
                    # Lane L addresses row 16kt + 8(L // 16) + L % 8 (rows past f read rows 8 lower:
                    # finite values times the zero rows of B) of column chunk w (+ 32 for L // 8 odd).
                    r0 = kt * 16 + (lane // 16) * 8 + lane % 8
                    r = T.if_then_else(r0 < f, r0, r0 - 8)
                    lb[kt] = r * 256 + ((warp ^ (r % 8)) + 32 * ((lane // 8) % 2)) * 4
                lm = (tx % 8) ^ (((tx // 16) % 4) * 2)

                if bx < m:
                    _copy_row(R, X, bx, tx, THREADS, 2 * n)
                for it in T.serial(T.ceildiv(T.max(m - bx, 0), blocks)):
                    tok = bx + it * blocks
                    T.call_extern("handle", "quad_cp_async_wait_all")
                    T.sync_threads()
                    # 1. SwiGLU into P: chunk c is row c // 64, column chunk c % 64, stored at
                    # column chunk (c % 64) ^ (row % 8).
                    for kk in T.unroll(-(-chunks // THREADS)):
                        c = kk * THREADS + tx
                        if chunks % THREADS == 0 or c < chunks:
                            T.call_extern("handle", "quad_swiglu8",
                                          T.address_of(S[kk * 1024 + (tx // 64) * 256 + (pc ^ (kk % 2 * 4)) * 4]),
                                          T.address_of(R[0, c * 8]), T.address_of(R[0, n + c * 8]))
                    T.sync_threads()
                    # R has been read: the next row's copy runs under the rest of this one.
                    if tok + blocks < m:
                        _copy_row(R, X, tok + blocks, tx, THREADS, 2 * n)
                    # 2. The A fragments of the thread's 8 (j, k-tile) tiles, column chunk w + 8j
                    # (32j floats on from lb[kt]), all in registers before S is overwritten.
                    for j in T.unroll(4):
                        for kt in T.unroll(2):
                            T.call_extern("handle", "quad_ldsm_x4_trans", T.address_of(af[(j * 2 + kt) * 8]),
                                          T.address_of(S[lb[kt] + 32 * j]))
                    T.sync_threads()  # every warp's P reads are done before S is written
                    # 3. An n-tile at a time (16 accumulators live): acc[j·4 + 2h + e] = output row
                    # o = 8nt + 2t + e, column w·8 + 64j + 256h + g; column bits 6, 7 (j) and 8 (h)
                    # in registers; then into S at s = o·512 + column (see _swizzle: conflict-free).
                    for nt in T.unroll(4):
                        T.call_extern("handle", "quad_dense_bfrag", T.address_of(bf[0]), lane, nt)
                        for i in T.unroll(16):
                            acc[i] = T.float32(0)
                        for j in T.unroll(4):
                            for kt in T.unroll(2):
                                T.ptx_mma("float32", "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                          af.data, (j * 2 + kt) * 8, bf.data, kt * 4, acc.data, j * 4,
                                          T.bool(False))
                        for e in T.unroll(2):
                            for hb in [1, 2, 4]:  # index bit of (j, h) as 2j + h
                                for jh in [jh for jh in range(8) if not jh & hb]:
                                    lo_i = (jh // 2) * 4 + 2 * (jh % 2) + e
                                    hi_i = ((jh + hb) // 2) * 4 + 2 * ((jh + hb) % 2) + e
                                    tmp[0] = acc[lo_i]
                                    acc[lo_i] = tmp[0] + acc[hi_i]
                                    acc[hi_i] = tmp[0] - acc[hi_i]
                        for j in T.unroll(4):
                            for h in T.unroll(2):
                                for e in T.unroll(2):
                                    at = (sb ^ (4 * j + 16 * h)) + (nt * 8 + e) * COLS + 64 * j + 256 * h
                                    if nt * 8 + 8 <= f:
                                        S[at] = acc[j * 4 + 2 * h + e]
                                    else:  # the zero-padded outputs are not stored
                                        if nt * 8 + 2 * t + e < f:
                                            S[at] = acc[j * 4 + 2 * h + e]
                    T.sync_threads()
                    # 4. Column bits 0-5: thread i < n / 64 takes positions 64i .. 64i + 63.
                    amax[0] = T.float32(0)
                    if tx < groups:
                        for q in T.unroll(16):
                            for k in T.vectorized(4):
                                v[4 * q + k] = S[tx * 64 + 32 * (q // 8) + 4 * ((q % 8) ^ lm) + k]
                        for bit in [1, 2, 4, 8, 16, 32]:
                            for u in [u for u in range(64) if not u & bit]:
                                tmp[0] = v[u]
                                v[u] = tmp[0] + v[u + bit]
                                v[u + bit] = tmp[0] - v[u + bit]
                        for u in T.unroll(64):
                            v[u] = v[u] * T.float32(norm)
                            amax[0] = T.max(amax[0], T.abs(v[u]))
                    scale = T.alloc_var("float32", init=_token_scale(_block_allreduce(amax[0], S, n, tx, warps, False),
                                                                     bits, clip))
                    rcp = T.alloc_var("float32", init=T.float32(1) / scale)
                    nscale = T.alloc_var("float32", init=T.float32(0) - scale)
                    if tx == 0:
                        XS[tok] = scale
                    if tx < groups:
                        for q in T.unroll(4):
                            for u in T.unroll(16):
                                qv[u] = _code(v[16 * q + u], nscale, rcp, bits)
                            for k in T.vectorized(16):
                                XQ[tok, tx * 64 + 16 * q + k] = qv[k]

        return main

    return build()


def hadamard_quant_mma(n: int, factors, bits: int, clip: float, blocks: int, target=None):
    """Build (and cache) the tensor-core variant of the gated streaming quantizer for a grid of
    `blocks` blocks (blocks_per_sm a SM, as hadamard_quant_stream). Call it as kernel(X, XQ, XS):
    X float16 gate_up [m, 2n] is read, XQ int8 [m, n] and XS float32 [m] are written."""
    return _hadamard_quant_mma(int(n), tuple(int(f) for f in factors), int(bits), float(clip), target, int(blocks))
