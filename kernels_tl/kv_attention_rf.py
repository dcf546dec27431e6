"""Decode attention over the paged int4 cache with K and V never in shared memory (TileLang, Hopper).

Same contract as `kv_attention.attention_decode`: one program per (sequence, kv head, split), the
split's normalized partial output and log2-sum-exp, merged by `attention_combine`. What differs is
the inside. The tile kernel dequantizes each 64-token block to float16 tiles in shared memory, and
its four warps then share one mma tile, so every block costs a chain of barriers and cross-warp
reductions (Nsight Compute at batch 32: 45% of cycles without an eligible warp, DRAM 20% busy).
Here each warp owns 16 tokens of every block and runs its own online softmax; the warps meet once,
at the end, to merge their (max, sum, output).

Inside a warp, all in registers (mma.sync m16n8k16, float16 in, float32 accumulate):
- Scores S = Q·Kᵀ: Q is the A operand (the GQA group's query rows, padded to 16), K the B operand.
  Each thread loads 16 contiguous bytes of one token and turns every 32-bit word into four half2
  of centred codes q - 8 (a mask-and-or makes the float16 1024 + q, one half2 subtract the exact
  q - 8); the order of head_dim inside the dot product is free, so Q is loaded in the same permuted
  order. The scale and the zero come after the mma: score = scale · (Q·(q - 8) - (zero - 8) · ΣQ).
- Output Oᵀ = Vᵀ·Pᵀ: V is the A operand, whose register pairs run along tokens while the cache packs
  two head_dim neighbours of one token in a byte; a byte permute interleaves two tokens' bytes
  before the same mask-and-or. P (times the token's V scale) is the B operand straight from the
  score accumulators (their layout is the B fragment of the next mma), and the query rows are the
  mma's N = 8, so a GQA group of up to 8 needs no padding. The zero of V comes out as one correction
  a row: Σ p·scale·(zero - 8).
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.pdl import wait_for_producers

from kernels_tl.targets import SM90, TARGETS  # noqa: F401

WARP_TOKENS = 16  # tokens of a cache block each warp owns (the mma's K for P·V, two n-tiles of Q·Kᵀ)

FRAG_SRC = r"""
// 8 int4 codes of a 32-bit word (low nibble first: v0..v7) -> half2 (v_j - 8, v_(j+4) - 8): a nibble
// or-ed into the mantissa of the float16 1024 (0x6400) is 1024 + n exactly, and 1024 + n - 1032 is
// n - 8 exactly. V takes the centred codes: with 1024 + n in the mma and the 1024 subtracted once at
// the end, the fp32 accumulators carried ~10^4 times the output of a near-uniform softmax over 4097
// tokens, and it missed the 1e-2 bound against the reference. K keeps 1024 + n (one op less).
#include <cuda_fp16.h>
__device__ __forceinline__ unsigned int quad_nib_pair(unsigned int w, int j) {
  return ((w >> (4 * j)) & 0x000F000Fu) | 0x64006400u;
}

__device__ __forceinline__ unsigned int quad_nib_centred(unsigned int w, int j) {
  const unsigned int biased = quad_nib_pair(w, j), offset = 0x64086408u;
  const half2 centred = __hsub2(*reinterpret_cast<const half2*>(&biased),
                                  *reinterpret_cast<const half2*>(&offset));
  return *reinterpret_cast<const unsigned int*>(&centred);
}

// K: `words` packed words of one token -> the B fragments of Q·Kᵀ, half2 4i + j = (v_8i+j, v_8i+j+4).
__device__ __forceinline__ void quad_k_frag(const void* src, void* dst, int words) {
  const unsigned int* w = reinterpret_cast<const unsigned int*>(src);
  unsigned int* o = reinterpret_cast<unsigned int*>(dst);
  #pragma unroll
  for (int i = 0; i < words; ++i) {
    #pragma unroll
    for (int j = 0; j < 4; ++j) o[4 * i + j] = quad_nib_pair(w[i], j);
  }
}

// V: `words` packed words of tokens x0, x1 (2t, 2t+1) and y0, y1 (2t+8, 2t+9) -> the A fragments of
// Vᵀ·Pᵀ. A byte permute puts two tokens' halves of a word side by side, so each half2 holds one
// head_dim element of two tokens. Word i gives m-tiles 4i + j (j = 0..3), whose fragment rows g and
// g + 8 are the thread's elements 8i + j and 8i + 4 + j: registers (x pair row g, x pair row g + 8,
// y pair row g, y pair row g + 8).
__device__ __forceinline__ void quad_v_frag(const void* x0, const void* x1, const void* y0, const void* y1,
                                            void* dst, int words) {
  const unsigned int* a = reinterpret_cast<const unsigned int*>(x0);
  const unsigned int* b = reinterpret_cast<const unsigned int*>(x1);
  const unsigned int* c = reinterpret_cast<const unsigned int*>(y0);
  const unsigned int* d = reinterpret_cast<const unsigned int*>(y1);
  unsigned int* o = reinterpret_cast<unsigned int*>(dst);
  #pragma unroll
  for (int i = 0; i < words; ++i) {
    const unsigned int lo[2] = {__byte_perm(a[i], b[i], 0x5410), __byte_perm(a[i], b[i], 0x7632)};
    const unsigned int hi[2] = {__byte_perm(c[i], d[i], 0x5410), __byte_perm(c[i], d[i], 0x7632)};
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      #pragma unroll
      for (int k = 0; k < 2; ++k) {
        o[4 * (4 * i + j) + k] = quad_nib_centred(lo[k], j);
        o[4 * (4 * i + j) + 2 + k] = quad_nib_centred(hi[k], j);
      }
    }
  }
}
"""


@functools.lru_cache(maxsize=None)
def attention_decode_rf(heads: int, kv_heads: int, head_dim: int, num_splits: int, block_size: int = 64,
                        sm_scale: float | None = None, target=None, min_blocks: int = 1):
    """Split-KV decode attention, warps split along tokens, fragments in registers. kernel(q,
    k_data, k_meta, v_data, v_meta, block_tables, context_lens, out_partial, lse) as
    kv_attention.attention_decode."""
    group = heads // kv_heads
    assert group <= 16 and head_dim % 64 == 0 and block_size % WARP_TOKENS == 0
    warps = block_size // WARP_TOKENS
    threads = 32 * warps
    half = head_dim // 2
    ksteps = head_dim // 16       # k-steps of Q·Kᵀ
    k_bytes = head_dim // 8       # bytes of a token's K each of 4 threads holds
    v_bytes = head_dim // 16      # bytes of a token's V each of 8 threads holds
    m_tiles = head_dim // 16      # 16-row tiles of Oᵀ (head_dim)
    row_tiles = -(-group // 8)    # n8 tiles of Oᵀ (query rows) = score rows g (and g + 8) a thread uses
    chunk = head_dim // 8         # head_dim elements of Oᵀ a thread holds, per query row
    scale_log2 = (sm_scale if sm_scale is not None else head_dim ** -0.5) * math.log2(math.e)
    neg_inf = -T.infinity("float32")

    @tilelang.jit(target=TARGETS[target])
    def build():
        b = T.dynamic("batch")
        nb = T.dynamic("num_blocks")
        width = T.dynamic("table_width")

        @T.macro
        def fetch_k(KD, KM, phys, kvh, warp, g, t, k_raw, k_meta):
            """This thread's K bytes of its warp's 16 tokens of cache block `phys` (tokens g and 8 + g)
            and the K (scale, zero) of tokens 2t, 2t+1, 2t+8, 2t+9 (whose scores it holds)."""
            base = warp * WARP_TOKENS
            for n in T.unroll(2):
                for c in T.vectorized(k_bytes):
                    k_raw[n * k_bytes + c] = KD[phys, kvh, base + 8 * n + g, k_bytes * t + c]
                for c in T.vectorized(4):
                    k_meta[4 * n + c] = KM[phys, kvh, base + 8 * n + 2 * t + c // 2, c % 2]

        @T.macro
        def fetch_v(VD, VM, phys, kvh, warp, g, t, v_raw, v_meta):
            """This thread's V bytes of tokens 2t, 2t+1, 2t+8, 2t+9 and their V (scale, zero)."""
            base = warp * WARP_TOKENS
            for v in T.unroll(4):
                for c in T.vectorized(v_bytes):
                    v_raw[v * v_bytes + c] = VD[phys, kvh, base + 2 * t + v % 2 + 8 * (v // 2), v_bytes * g + c]
            for n in T.unroll(2):
                for c in T.vectorized(4):
                    v_meta[4 * n + c] = VM[phys, kvh, base + 8 * n + 2 * t + c // 2, c % 2]

        @T.prim_func
        def main(Q: T.Tensor((b, heads, head_dim), "float16"),
                 KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                 KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                 VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                 VM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                 TABLES: T.Tensor((b, width), "int32"), LENS: T.Tensor((b,), "int32"),
                 OP: T.Tensor((b, heads, num_splits, head_dim), "float32"),
                 LSE: T.Tensor((b, heads, num_splits), "float32")):
            with T.Kernel(b, kv_heads, num_splits, threads=threads) as (seq, kvh, split):
                if min_blocks > 1:
                    T.annotate_min_blocks_per_sm(min_blocks)
                T.import_source(FRAG_SRC)
                o_s = T.alloc_shared((warps, group, head_dim), "float32")
                ml_s = T.alloc_shared((warps, 2, group), "float32")  # each warp's row max and sum
                qa = T.alloc_local((ksteps * 8,), "float16")      # Q, A fragments of Q·Kᵀ
                k_raw = T.alloc_local((2 * k_bytes,), "uint8")    # a cache block's bytes, loaded
                v_raw = T.alloc_local((4 * v_bytes,), "uint8")    # one block ahead
                k_meta = T.alloc_local((8,), "float16")
                v_meta = T.alloc_local((8,), "float16")
                kb = T.alloc_local((ksteps * 4,), "float16")      # one n-tile's K, B fragments
                va = T.alloc_local((32,), "float16")              # V of four m-tiles, A fragments of Vᵀ·Pᵀ
                sacc = T.alloc_local((8,), "float32")             # scores: 2 n-tiles x 4
                pb = T.alloc_local((row_tiles * 4,), "float16")   # P·scale_v, B fragments of Vᵀ·Pᵀ
                oacc = T.alloc_local((row_tiles * m_tiles * 4,), "float32")
                qsum = T.alloc_local((2,), "float32")
                m = T.alloc_local((2,), "float32")
                m_use = T.alloc_local((2,), "float32")
                alpha = T.alloc_local((2,), "float32")
                l = T.alloc_local((2,), "float32")
                corr = T.alloc_local((2,), "float32")
                mx = T.alloc_local((1,), "float32")
                top = T.alloc_local((1,), "float32")
                total = T.alloc_local((1,), "float32")
                acc = T.alloc_local((1,), "float32")
                wait_for_producers("attention")

                tx = T.get_thread_binding()
                warp, lane = tx // 32, tx % 32
                g, t = lane // 4, lane % 4
                ctx = LENS[seq]
                n_blocks = T.ceildiv(ctx, block_size)
                per_split = T.ceildiv(n_blocks, num_splits)
                first = split * per_split
                count = T.max(T.min(n_blocks - first, per_split), 0)

                # Q in the order the K fragments hold head_dim: k-step s, fragment column c (k = 2t,
                # 2t+1, 2t+8, 2t+9) is element k_bytes/2·4·t... of the thread's K bytes (see FRAG_SRC).
                for r in T.unroll(2):
                    qsum[r] = 0
                for s in T.unroll(ksteps):
                    for c in T.unroll(4):
                        d = 2 * k_bytes * t + 8 * (s // 2) + 2 * (s % 2) + c // 2 + 4 * (c % 2)
                        for r in T.unroll(2):
                            row = g + 8 * r
                            qa[8 * s + 4 * (c // 2) + 2 * r + c % 2] = T.if_then_else(
                                row < group, Q[seq, kvh * group + row, d], T.float16(0))
                            qsum[r] = qsum[r] + T.Cast("float32", qa[8 * s + 4 * (c // 2) + 2 * r + c % 2])
                for r in T.unroll(2):
                    qsum[r] = qsum[r] + T.shfl_xor(qsum[r], 1)
                    qsum[r] = qsum[r] + T.shfl_xor(qsum[r], 2)
                    m[r] = neg_inf
                    l[r] = 0
                    corr[r] = 0
                for i in T.unroll(row_tiles * m_tiles * 4):
                    oacc[i] = 0

                nxt = T.alloc_local((1,), "int32")
                if count > 0:
                    nxt[0] = TABLES[seq, first]
                    fetch_k(KD, KM, nxt[0], kvh, warp, g, t, k_raw, k_meta)
                    fetch_v(VD, VM, nxt[0], kvh, warp, g, t, v_raw, v_meta)
                for it in T.serial(count):
                    # S = Q·(q_k - 8)ᵀ for tokens g (n-tile 0) and 8 + g (n-tile 1)
                    for n in T.unroll(2):
                        for c in T.unroll(4):
                            sacc[4 * n + c] = 0
                        T.call_extern("handle", "quad_k_frag", T.address_of(k_raw[n * k_bytes]), T.address_of(kb[0]),
                                      k_bytes // 4)
                        for s in T.unroll(ksteps):
                            T.ptx_mma("float32", "m16n8k16", "row", "col", "fp16", "fp16", "fp32", qa.data, 8 * s,
                                      kb.data, 4 * s, sacc.data, 4 * n, T.bool(False))

                    # Scores of tokens 2t + c % 2 + 8n, rows g + 8(c // 2): scale, zero, mask, log2 units.
                    pos0 = (first + it) * block_size + warp * WARP_TOKENS + 2 * t
                    for n in T.unroll(2):
                        for c in T.unroll(2 * row_tiles):
                            j = 2 * n + c % 2
                            sacc[4 * n + c] = T.if_then_else(
                                pos0 + 8 * n + c % 2 < ctx,
                                (sacc[4 * n + c] - (T.Cast("float32", k_meta[2 * j + 1]) + T.float32(1024))
                                 * qsum[c // 2]) * (T.Cast("float32", k_meta[2 * j]) * T.float32(scale_log2)),
                                neg_inf)
                    if it + 1 < count:  # the next block's K in flight from here to its scores
                        nxt[0] = TABLES[seq, first + it + 1]
                        fetch_k(KD, KM, nxt[0], kvh, warp, g, t, k_raw, k_meta)
                    for r in T.unroll(row_tiles):
                        mx[0] = T.max(T.max(sacc[2 * r], sacc[2 * r + 1]), T.max(sacc[4 + 2 * r], sacc[5 + 2 * r]))
                        mx[0] = T.max(mx[0], T.shfl_xor(mx[0], 1))
                        mx[0] = T.max(mx[0], T.shfl_xor(mx[0], 2))
                        mx[0] = T.max(m[r], mx[0])
                        m_use[r] = T.if_then_else(mx[0] == neg_inf, T.float32(0), mx[0])
                        alpha[r] = T.exp2(m[r] - m_use[r])
                        m[r] = mx[0]
                        l[r] = l[r] * alpha[r]
                        corr[r] = corr[r] * alpha[r]
                        for n in T.unroll(2):
                            for c in T.unroll(2):
                                j = 2 * n + c
                                p = T.exp2(sacc[4 * n + 2 * r + c] - m_use[r])
                                l[r] = l[r] + p
                                pb[4 * r + 2 * n + c] = T.Cast("float16", p * T.Cast("float32", v_meta[2 * j]))
                                corr[r] = corr[r] + T.Cast("float32", pb[4 * r + 2 * n + c]) * (
                                    T.Cast("float32", v_meta[2 * j + 1]) - T.float32(8))

                    # Oᵀ = α·Oᵀ + (q_v - 8)ᵀ·(p·scale_v)ᵀ; Oᵀ's columns are query rows 2t, 2t+1 (+8).
                    for r in T.unroll(row_tiles):
                        for cc in T.unroll(2):
                            mx[0] = T.shfl_sync(alpha[r], (2 * t + cc) * 4)
                            for mt in T.unroll(m_tiles):
                                for h in T.unroll(2):
                                    oacc[(r * m_tiles + mt) * 4 + 2 * h + cc] = (
                                        oacc[(r * m_tiles + mt) * 4 + 2 * h + cc] * mx[0])
                    # A packed word at a time (four m-tiles), so only its 8 registers of V fragments
                    # are live; the next block's V loads go out after the last one.
                    for i in T.unroll(v_bytes // 4):
                        T.call_extern("handle", "quad_v_frag", T.address_of(v_raw[4 * i]),
                                      T.address_of(v_raw[v_bytes + 4 * i]), T.address_of(v_raw[2 * v_bytes + 4 * i]),
                                      T.address_of(v_raw[3 * v_bytes + 4 * i]), T.address_of(va[0]), 1)
                        for r in T.unroll(row_tiles):
                            for j in T.unroll(4):
                                T.ptx_mma("float32", "m16n8k16", "row", "col", "fp16", "fp16", "fp32", va.data, 8 * j,
                                          pb.data, 4 * r, oacc.data, (r * m_tiles + 4 * i + j) * 4, T.bool(False))
                    if it + 1 < count:  # and its V from here to its P·V
                        fetch_v(VD, VM, nxt[0], kvh, warp, g, t, v_raw, v_meta)

                # The warp's rows: sums and corrections over the quad, then Oᵀ less the correction
                # into shared memory, row max and sum beside it.
                for r in T.unroll(row_tiles):
                    l[r] = l[r] + T.shfl_xor(l[r], 1)
                    l[r] = l[r] + T.shfl_xor(l[r], 2)
                    corr[r] = corr[r] + T.shfl_xor(corr[r], 1)
                    corr[r] = corr[r] + T.shfl_xor(corr[r], 2)
                    if t == 0 and g + 8 * r < group:
                        ml_s[warp, 0, g + 8 * r] = m[r]
                        ml_s[warp, 1, g + 8 * r] = l[r]
                for r in T.unroll(row_tiles):
                    for cc in T.unroll(2):
                        mx[0] = T.shfl_sync(corr[r], (2 * t + cc) * 4)
                        if 8 * r + 2 * t + cc < group:
                            for mt in T.unroll(m_tiles):
                                for h in T.unroll(2):
                                    o_s[warp, 8 * r + 2 * t + cc, chunk * g + 8 * (mt // 4) + mt % 4 + 4 * h] = (
                                        oacc[(r * m_tiles + mt) * 4 + 2 * h + cc] - mx[0])
                T.sync_threads()

                for e in T.serial(T.ceildiv(group * head_dim, threads)):
                    item = e * threads + tx
                    if item < group * head_dim:
                        i, d = item // head_dim, item % head_dim
                        top[0] = neg_inf
                        for w in T.unroll(warps):
                            top[0] = T.max(top[0], ml_s[w, 0, i])
                        total[0] = 0
                        acc[0] = 0
                        for w in T.unroll(warps):
                            wt = T.if_then_else(ml_s[w, 0, i] == neg_inf, T.float32(0), T.exp2(ml_s[w, 0, i] - top[0]))
                            total[0] = total[0] + wt * ml_s[w, 1, i]
                            acc[0] = acc[0] + wt * o_s[w, i, d]
                        OP[seq, kvh * group + i, split, d] = T.if_then_else(total[0] > 0, acc[0] / total[0],
                                                                            T.float32(0))
                        if d == 0:
                            LSE[seq, kvh * group + i, split] = T.if_then_else(
                                total[0] > 0, T.log2(total[0]) + top[0], neg_inf)

        return main

    return build()
