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
  of centred codes q - 8 (quad_word_centred: one shift a word, a mask-and-or and one half2
  subtract or fma per half2, all exact); the order of head_dim inside the dot product is free, so
  Q is loaded in the same permuted order. The scale and the zero come after the mma:
  score = scale · (Q·(q - 8) - (zero - 8) · ΣQ).
- Output Oᵀ = Vᵀ·Pᵀ: V is the A operand, whose register pairs run along tokens while the cache packs
  two head_dim neighbours of one token in a byte; a byte permute interleaves two tokens' bytes
  before the same conversion. P (times the token's V scale) is the B operand straight from the
  score accumulators (their layout is the B fragment of the next mma), and the query rows are the
  mma's N = 8, so a GQA group of up to 8 needs no padding. The zero of V comes out as one correction
  a row: Σ p·scale·(zero - 8).
- The next cache blocks' bytes are in flight while a block is computed: one block in registers
  (stages=1), or a per-thread cp.async ring in shared memory (stages>1) on grids too sparse for
  four resident programs a SM to hide the latency.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.kv_attention import decode_main, split_blocks
from kernels_tl.kv_fragments import FRAG_SRC
from kernels_tl.pdl import wait_for_producers

from kernels_tl.targets import SM90, TARGETS  # noqa: F401

WARP_TOKENS = 16  # tokens of a cache block each warp owns (the mma's K for P·V, two n-tiles of Q·Kᵀ)


@functools.lru_cache(maxsize=None)
def attention_decode_rf(heads: int, kv_heads: int, head_dim: int, num_splits: int, block_size: int = 64,
                        sm_scale: float | None = None, target=None, min_blocks: int = 1, stages: int = 1,
                        rescale_slack: float = 0.0):
    """Split-KV decode attention, warps split along tokens, fragments in registers. kernel(q,
    k_data, k_meta, v_data, v_meta, block_tables, context_lens, out_partial, lse) as
    kv_attention.attention_decode.

    stages: 1, each thread holds the next cache block's bytes in registers (one block in flight a
    warp); 2-5, a ring of `stages` blocks in shared memory that each thread fills with cp.async
    for its own bytes, stages - 1 blocks in flight (12 KB a stage at head_dim 128).

    rescale_slack (log2 units; 0: every block): a row's reference max moves, and the output, sum
    and correction are rescaled, only when the row's max passes it by more than this, decided for
    the warp at once (__any_sync), so most blocks of a long context skip the rescale's multiplies
    and shuffles. Probabilities then reach 2^rescale_slack before the final normalization (float32
    sums; P·scale_v in float16 stays far from its range at 8)."""
    assert 1 <= stages <= 5 and 0 <= rescale_slack <= 10
    group = heads // kv_heads
    assert group <= 16 and head_dim % 64 == 0 and block_size % WARP_TOKENS == 0
    warps = block_size // WARP_TOKENS
    threads = 32 * warps
    ksteps = head_dim // 16       # k-steps of Q·Kᵀ
    k_bytes = head_dim // 8       # bytes of a token's K each of 4 threads holds
    v_bytes = head_dim // 16      # bytes of a token's V each of 8 threads holds
    m_tiles = head_dim // 16      # 16-row tiles of Oᵀ (head_dim)
    row_tiles = -(-group // 8)    # n8 tiles of Oᵀ (query rows) = score rows g (and g + 8) a thread uses
    chunk = head_dim // 8         # head_dim elements of Oᵀ a thread holds, per query row
    scale_log2 = (sm_scale if sm_scale is not None else head_dim ** -0.5) * math.log2(math.e)
    neg_inf = -T.infinity("float32")
    # The ring's layout, [stage, 16-byte piece, thread, byte]: a thread's slot is its K bytes of two
    # tokens, then its V bytes of four, in 16-byte pieces strided by the thread count, so each
    # 16-byte read of a warp touches 32 consecutive pieces (no bank conflicts).
    pieces = (2 * k_bytes + 4 * v_bytes) // 16

    @tilelang.jit(target=TARGETS[target])
    def build():
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

        @T.macro
        def issue(KD, KM, VD, VM, phys, kvh, warp, g, t, tx, ring, ring_meta, st):
            """fetch_k and fetch_v of cache block `phys` as cp.async into ring stage `st`."""
            base = warp * WARP_TOKENS
            for n in T.unroll(2):
                o = n * k_bytes
                T.call_extern("handle", f"quad_cp_async{k_bytes}", T.address_of(ring[st, o // 16, tx, o % 16]),
                              T.address_of(KD[phys, kvh, base + 8 * n + g, k_bytes * t]))
                T.call_extern("handle", "quad_cp_async8", T.address_of(ring_meta[st, 0, tx, 4 * n]),
                              T.address_of(KM[phys, kvh, base + 8 * n + 2 * t, 0]))
                T.call_extern("handle", "quad_cp_async8", T.address_of(ring_meta[st, 1, tx, 4 * n]),
                              T.address_of(VM[phys, kvh, base + 8 * n + 2 * t, 0]))
            for v in T.unroll(4):
                o = 2 * k_bytes + v * v_bytes
                T.call_extern("handle", f"quad_cp_async{v_bytes}", T.address_of(ring[st, o // 16, tx, o % 16]),
                              T.address_of(VD[phys, kvh, base + 2 * t + v % 2 + 8 * (v // 2), v_bytes * g]))

        @T.macro
        def read_k(ring, ring_meta, tx, st, k_raw, k_meta):
            for n in T.unroll(2):
                for c in T.vectorized(k_bytes):
                    k_raw[n * k_bytes + c] = ring[st, (n * k_bytes) // 16, tx, (n * k_bytes) % 16 + c]
                for c in T.vectorized(4):
                    k_meta[4 * n + c] = ring_meta[st, 0, tx, 4 * n + c]

        @T.macro
        def read_v(ring, ring_meta, tx, st, v_raw, v_meta):
            for v in T.unroll(4):
                for c in T.vectorized(v_bytes):
                    v_raw[v * v_bytes + c] = ring[st, (2 * k_bytes + v * v_bytes) // 16, tx,
                                                  (2 * k_bytes + v * v_bytes) % 16 + c]
            for c in T.vectorized(8):
                v_meta[c] = ring_meta[st, 1, tx, c]

        @T.macro
        def probabilities(r, sacc, m_use, l, pb, corr, v_meta):
            """Row r's probabilities against the reference max m_use: into the row sum, as P·scale_v
            into the B fragments of Vᵀ·Pᵀ, and into the row's zero correction."""
            for n in T.unroll(2):
                for c in T.unroll(2):
                    j = 2 * n + c
                    p = T.exp2(sacc[4 * n + 2 * r + c] - m_use[r])
                    l[r] = l[r] + p
                    pb[4 * r + 2 * n + c] = T.Cast("float16", p * T.Cast("float32", v_meta[2 * j]))
                    corr[r] = corr[r] + T.Cast("float32", pb[4 * r + 2 * n + c]) * (
                        T.Cast("float32", v_meta[2 * j + 1]) - T.float32(8))

        @T.macro
        def rescale_output(alpha, oacc, t, mx):
            """Oᵀ = α·Oᵀ; Oᵀ's columns are query rows 2t, 2t+1 (+8), whose α the lanes 4(2t + cc)
            hold."""
            for r in T.unroll(row_tiles):
                for cc in T.unroll(2):
                    mx[0] = T.shfl_sync(alpha[r], (2 * t + cc) * 4)
                    for mt in T.unroll(m_tiles):
                        for h in T.unroll(2):
                            i = (r * m_tiles + mt) * 4 + 2 * h + cc
                            oacc[i] = oacc[i] * mx[0]

        @T.macro
        def program(Q, KD, KM, VD, VM, TABLES, LENS, OP, LSE, seq, kvh, split):
            """One (sequence, kv head, split) program: its partial output and log2-sum-exp."""
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            T.import_source(FRAG_SRC)
            o_s = T.alloc_shared((warps, group, head_dim), "float32")
            ml_s = T.alloc_shared((warps, 2, group), "float32")  # each warp's row max and sum
            if stages > 1:
                ring = T.alloc_shared((stages, pieces, threads, 16), "uint8")
                ring_meta = T.alloc_shared((stages, 2, threads, 8), "float16")  # K, V (scale, zero) x 4
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
            if rescale_slack > 0:
                grow = T.alloc_local((1,), "int32")
            top = T.alloc_local((1,), "float32")
            total = T.alloc_local((1,), "float32")
            acc = T.alloc_local((1,), "float32")
            wait_for_producers("attention")

            tx = T.get_thread_binding()
            warp, lane = tx // 32, tx % 32
            g, t = lane // 4, lane % 4
            ctx = LENS[seq]
            first, count = split_blocks(ctx, split, num_splits, block_size)

            # Q in the order the K fragments hold head_dim: k-step s, fragment column c (k = 2t,
            # 2t+1, 2t+8, 2t+9) is element k_bytes/2·4·t... of the thread's K bytes (see kv_fragments.py).
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
            if stages == 1:
                if count > 0:
                    nxt[0] = TABLES[seq, first]
                    fetch_k(KD, KM, nxt[0], kvh, warp, g, t, k_raw, k_meta)
                    fetch_v(VD, VM, nxt[0], kvh, warp, g, t, v_raw, v_meta)
            else:  # blocks 0 .. stages - 2 in flight, one commit group each (empty past the end)
                for j in T.unroll(stages - 1):
                    if j < count:
                        issue(KD, KM, VD, VM, TABLES[seq, first + j], kvh, warp, g, t, tx, ring, ring_meta, j)
                    T.call_extern("handle", "quad_cp_commit")
            for it in T.serial(count):
                if stages > 1:  # block it + stages - 1 into the stage block it - 1 left; wait for block it
                    if it + stages - 1 < count:
                        issue(KD, KM, VD, VM, TABLES[seq, first + it + stages - 1], kvh, warp, g, t, tx, ring,
                              ring_meta, (it + stages - 1) % stages)
                    T.call_extern("handle", "quad_cp_commit")
                    T.call_extern("handle", f"quad_cp_wait{stages - 1}")
                    read_k(ring, ring_meta, tx, it % stages, k_raw, k_meta)
                # S = Q·(K codes)ᵀ for tokens g (n-tile 0) and 8 + g (n-tile 1)
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
                            (sacc[4 * n + c] - (T.Cast("float32", k_meta[2 * j + 1]) + T.float32(-8))
                             * qsum[c // 2]) * (T.Cast("float32", k_meta[2 * j]) * T.float32(scale_log2)),
                            neg_inf)
                if stages == 1 and it + 1 < count:  # the next block's K in flight from here to its scores
                    nxt[0] = TABLES[seq, first + it + 1]
                    fetch_k(KD, KM, nxt[0], kvh, warp, g, t, k_raw, k_meta)
                if stages > 1:
                    read_v(ring, ring_meta, tx, it % stages, v_raw, v_meta)
                if rescale_slack == 0:
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
                        probabilities(r, sacc, m_use, l, pb, corr, v_meta)
                    rescale_output(alpha, oacc, t, mx)
                else:  # the reference max moves only when a row's max passes it by rescale_slack
                    grow[0] = 0
                    for r in T.unroll(row_tiles):
                        mx[0] = T.max(T.max(sacc[2 * r], sacc[2 * r + 1]), T.max(sacc[4 + 2 * r], sacc[5 + 2 * r]))
                        mx[0] = T.max(mx[0], T.shfl_xor(mx[0], 1))
                        mx[0] = T.max(mx[0], T.shfl_xor(mx[0], 2))
                        m_use[r] = T.max(m[r], mx[0])  # the row's new max, for now
                        grow[0] = T.if_then_else(m_use[r] > m[r] + T.float32(rescale_slack), 1, grow[0])
                    if T.call_extern("int32", "quad_warp_any", grow[0]) != 0:  # warp-uniform
                        for r in T.unroll(row_tiles):
                            alpha[r] = T.exp2(m[r] - T.if_then_else(m_use[r] == neg_inf, T.float32(0), m_use[r]))
                            m[r] = m_use[r]
                            l[r] = l[r] * alpha[r]
                            corr[r] = corr[r] * alpha[r]
                        rescale_output(alpha, oacc, t, mx)
                    for r in T.unroll(row_tiles):
                        m_use[r] = T.if_then_else(m[r] == neg_inf, T.float32(0), m[r])
                        probabilities(r, sacc, m_use, l, pb, corr, v_meta)
                # Oᵀ += (q_v - 8)ᵀ·(p·scale_v)ᵀ, a packed word at a time (four m-tiles), so only its
                # 8 registers of V fragments are live; the next block's V loads go out after the last one.
                for i in T.unroll(v_bytes // 4):
                    T.call_extern("handle", "quad_v_frag", T.address_of(v_raw[4 * i]),
                                  T.address_of(v_raw[v_bytes + 4 * i]), T.address_of(v_raw[2 * v_bytes + 4 * i]),
                                  T.address_of(v_raw[3 * v_bytes + 4 * i]), T.address_of(va[0]), 1)
                    for r in T.unroll(row_tiles):
                        for j in T.unroll(4):
                            T.ptx_mma("float32", "m16n8k16", "row", "col", "fp16", "fp16", "fp32", va.data, 8 * j,
                                      pb.data, 4 * r, oacc.data, (r * m_tiles + 4 * i + j) * 4, T.bool(False))
                if stages == 1 and it + 1 < count:  # and its V from here to its P·V
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

        return decode_main(heads, kv_heads, head_dim, num_splits, block_size, threads, program)

    return build()
