"""Online Hadamard + per-token quantization spread over a thread-block cluster: the few-token case.

`hadamard_quant` (kernels_tl.hadamard_quant) gives each token row one thread block. At decode
sizes that is one block on one SM doing the whole transform: the gated 14336-wide down_proj input
of Llama-3-8B took 17 µs a call on an H200 at M = 1 (11 µs with the best block shape: compute
and latency bound on one SM), a fifth of the decode step. Here each token gets a cluster of C
blocks (sm_90 thread-block clusters) that split the row and exchange it once through distributed
shared memory:

    row = [f, p] (element i·p + j), H = A_f ⊗ H_p, H_p = H_C ⊗ H_(p/C) (Sylvester)
    rank r of the cluster owns the columns j = r·(p/C) + c, all f rows of them:
      1. load its columns (gated: silu(gate) * up, in torch's float16 arithmetic), in shared memory
      2. the dense f-point product down each column, then the butterfly over its p/C columns
      3. cluster barrier; output (i, r·(p/C) + c) = Σ_r' (−1)^popc(r·r') · peer r' value (i, c),
         read from the peers' shared memory
      4. block max|y|, pushed into every peer's shared memory; cluster barrier; the token's scale;
         quantize and store the rank's columns

Same numerics as `hadamard_quant` (and so `reference.quantize_act(apply_hadamard(x))`): float32
throughout, the scale and rounding helpers of kernels_tl.quantize; only the Hadamard's float32
summation order differs. M is dynamic.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.hadamard_rows import _is_pow2, _quad_combos, _quad_terms, _signed_chain, _swiglu_f16
from kernels_tl.pdl import wait_for_producers
from kernels_tl.quantize import _PASS_CONFIGS, _block_allreduce, _qmax, _quantize, _token_scale
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# Distributed shared memory and the cluster barrier, as PTX (sm_90): mapa turns a shared-memory
# address of this block into the same address in block `rank` of the cluster. The barrier's
# release / acquire orders the shared-memory writes before it against the peers' reads after it.
_CLUSTER_SRC = r"""
__device__ __forceinline__ unsigned quad_peer_addr(const void* local, int rank) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local)), remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}
__device__ __forceinline__ float quad_peer_load(const float* local, int rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(quad_peer_addr(local, rank)) : "memory");
  return v;
}
__device__ __forceinline__ void quad_peer_store(float* local, int rank, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(quad_peer_addr(local, rank)), "f"(v) : "memory");
}
__device__ __forceinline__ void quad_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
"""


def cluster_layout(n: int, factors: tuple, block, cluster: int = 8):
    """(f, p) of a row the cluster kernel takes, or None: one Hadamard over the whole row (no
    block-diagonal fallback), factors [f, 2^k] / [2^k], and at least 8 columns per rank."""
    if block is not None or math.prod(factors) != n:
        return None
    odd = [f for f in factors if not _is_pow2(f)]
    if len(odd) > 1 or (odd and factors[0] != odd[0]):
        return None
    f = odd[0] if odd else 1
    p = n // f
    if p % cluster or p // cluster < 8 or f > 32 or (f > 1 and f % 4):
        return None
    return f, p


@functools.lru_cache(maxsize=None)
def _hadamard_quant_cluster(n: int, factors: tuple, bits: int, clip: float, target, cluster: int, threads: int,
                            gated: bool, fast_silu: bool = False):
    _qmax(bits)
    layout = cluster_layout(n, factors, None, cluster)
    if layout is None:
        raise NotImplementedError(f"Hadamard factors {list(factors)} of {n}: no cluster layout")
    f, p = layout
    C = cluster
    cw = p // C                        # columns per rank
    E = f * cw                         # elements per rank
    warps = threads // 32
    vec = 8                            # fp16 elements per global load (cw is a power of two >= 8)
    nvec = E // vec
    ept = -(-E // threads)             # outputs per thread in the exchange
    norm = 1.0 / math.sqrt(n)
    A = None
    if f > 1:
        from kernels_tl.hadamard import _factor_pm1
        A = _factor_pm1(f)
    quads = f // 4
    terms = [_quad_terms(A, i, quads) for i in range(f)] if f > 1 else None
    # Dense phase: `groups` threads per column, each computing every groups-th output of it from
    # all f inputs (the quad sums are recomputed by each: 3.5 adds per input).
    groups = max(1, min(f, threads // cw)) if f > 1 else 1
    while f > 1 and f % groups:
        groups -= 1
    outs = f // groups
    units = cw * groups
    # Butterfly inside a rank's columns: passes of up to 3 bits, one group of 2^radix elements
    # (stride 2^s within a row) per thread at a time.
    kbits = cw.bit_length() - 1
    passes = [(s, min(3, kbits - s)) for s in range(0, kbits, 3)]

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, 2 * n if gated else n), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(m * C, threads=threads, cluster_dims=(C, 1, 1)) as bx:
                T.import_source(_CLUSTER_SRC)
                wait_for_producers("hadamard_quant")
                tx = T.get_thread_binding()
                tok = bx // C
                rank = bx % C
                # One shared buffer: [0, E) the rank's columns as loaded ([f, cw]), [E, 2E) after the
                # dense product, then the block reduction's slots and the peers' maxima. Separate
                # buffers could be overlaid by TileLang's memory planner, which cannot see that the
                # peers still read this block's columns after its own last use of them.
                B = T.alloc_shared((2 * E + warps + C,), "float32")
                RED = 2 * E
                xh = T.alloc_local((vec,), "float32")

                # 1. load: vectors of `vec` adjacent columns of one row
                for kk in T.serial(-(-nvec // threads)):
                    v = kk * threads + tx
                    if nvec % threads == 0 or v < nvec:
                        e0 = v * vec
                        i = e0 // cw
                        g0 = i * p + rank * cw + e0 % cw
                        if gated:
                            for e in T.unroll(vec):
                                xh[e] = _swiglu_f16(X[tok, g0 + e], X[tok, n + g0 + e], fast_silu)
                        else:
                            for e in T.vectorized(vec):
                                xh[e] = T.Cast("float32", X[tok, g0 + e])
                        for e in T.vectorized(vec):
                            B[e0 + e] = xh[e]
                T.sync_threads()

                # 2a. the dense f-point product down each column (x @ A, signs baked in)
                src = 0  # offset in B of the values the butterflies run on
                if f > 1:
                    xin = T.alloc_local((f, 1), "float32")
                    comb = T.alloc_local((1, quads, 8), "float32")
                    for kk in T.serial(-(-units // threads)):
                        u = kk * threads + tx
                        if units % threads == 0 or u < units:
                            c = u % cw
                            grp = u // cw
                            for i in T.unroll(f):
                                xin[i, 0] = B[i * cw + c]
                            _quad_combos(xin, comb, 0, quads)
                            for o in list(range(outs)):
                                for gsel in list(range(groups)):
                                    if grp == gsel:
                                        i = o * groups + gsel
                                        B[E + i * cw + c] = _signed_chain([(sg, comb[0, j, k]) for sg, j, k in terms[i]])
                    T.sync_threads()
                    src = E
                # 2b. butterfly over the rank's cw columns of each row, in place in `src`
                ga = T.alloc_local((8,), "float32")
                gb = T.alloc_local((8,), "float32")
                for s, radix in passes:
                    size = 1 << radix
                    ngroups = E // size
                    for kk in T.serial(-(-ngroups // threads)):
                        gid = kk * threads + tx
                        if ngroups % threads == 0 or gid < ngroups:
                            # group gid: `radix` zero bits inserted at bit s of the element index
                            base = ((gid >> s) << (s + radix)) + (gid & ((1 << s) - 1))
                            for u in T.unroll(size):
                                ga[u] = B[src + base + (u << s)]
                            for b in list(range(radix)):
                                h = 1 << b
                                fr, to = (ga, gb) if b % 2 == 0 else (gb, ga)
                                for u in [u for u in range(size) if not u & h]:
                                    to[u] = fr[u] + fr[u + h]
                                    to[u + h] = fr[u] - fr[u + h]
                            res = ga if radix % 2 == 0 else gb
                            for u in T.unroll(size):
                                B[src + base + (u << s)] = res[u]
                    T.sync_threads()

                # 3. the butterfly across ranks, reading the peers' columns
                T.call_extern("handle", "quad_cluster_sync")
                yv = T.alloc_local((ept,), "float32")
                amax = T.alloc_var("float32", init=0)
                for t in T.unroll(ept):
                    e = t * threads + tx
                    yv[t] = T.float32(0)
                    if E % threads == 0 or e < E:
                        acc = T.alloc_var("float32", init=0)
                        for r2 in list(range(C)):
                            val = T.call_extern("float32", "quad_peer_load", T.address_of(B[src + e]), r2)
                            if r2 == 0:
                                acc = val
                            else:  # H_C[rank, r2] = (-1)^parity(rank & r2)
                                parity = functools.reduce(lambda a, b: a ^ b, [rank >> b for b in range(C.bit_length())
                                                                               if r2 >> b & 1]) & 1
                                acc = T.if_then_else(parity == 1, acc - val, acc + val)
                        yv[t] = acc * T.float32(norm)
                        amax = T.max(amax, T.abs(yv[t]))

                # 4. the token's max over the cluster: each block pushes its max into every peer
                bmax = _block_allreduce(amax, B, RED, tx, warps, False)
                if tx < C:
                    T.call_extern("handle", "quad_peer_store", T.address_of(B[RED + warps + rank]), tx, bmax)
                T.call_extern("handle", "quad_cluster_sync")
                tmax = T.alloc_var("float32", init=B[RED + warps])
                for r2 in range(1, C):
                    tmax = T.max(tmax, B[RED + warps + r2])
                scale = T.alloc_var("float32", init=_token_scale(tmax, bits, clip))
                rcp = T.alloc_var("float32", init=T.float32(1) / scale)
                if rank == 0 and tx == 0:
                    XS[tok] = scale
                for t in T.unroll(ept):
                    e = t * threads + tx
                    if E % threads == 0 or e < E:
                        XQ[tok, (e // cw) * p + rank * cw + e % cw] = _quantize(yv[t], scale, rcp, bits)

        return main

    return build()


def hadamard_quant_cluster(n: int, factors, bits: int, clip: float, target=None, cluster: int = 8,
                           threads: int = 256, gated: bool = False, fast_silu: bool = False):
    """Build (and cache) the cluster variant of `hadamard_quant` (same call: kernel(X, XQ, XS), X
    float16 [m, n] or gate_up [m, 2n] with gated; XQ int8 [m, n], XS float32 [m] written). For
    rows `cluster_layout` accepts; raises NotImplementedError otherwise. fast_silu: as in
    `hadamard_quant`."""
    return _hadamard_quant_cluster(int(n), tuple(int(f) for f in factors), int(bits), float(clip), target,
                                   int(cluster), int(threads), bool(gated), bool(fast_silu))
