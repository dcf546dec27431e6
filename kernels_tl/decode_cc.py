"""Decode attention on the CUDA cores (TileLang + inline CUDA device functions): the same
split-KV contract as `kv_attention.attention_decode` (normalized partial outputs and their
log2-sum-exp per split, merged by `kv_attention.attention_combine`), for GQA groups of up to 8.

Why: at one query per sequence the mma kernel's 16-row tile holds a GQA group of 4 (three
quarters padding) and its 64-column score tile is split over 4 warps, so every cache block costs
two block-wide reductions (max, sum), ~8 barriers and a float16 round trip of K / V through shared
memory (Nsight Compute, batch 32 x 1024: 20% of DRAM bandwidth, 48% of issue slots). Here each
warp owns 16 tokens of every cache block and keeps its own online-softmax state (no barrier in the
loop): lane t (and t + 16, for the other half of head_dim) dequantizes token t's K row in
registers and takes its dot products with the group's queries (float32, from shared memory); the
P·V product has lane l own head_dim / 32 output dimensions. The 4 warps' states merge once per
split. Scores are float32 throughout (the reference's precision; the mma kernel rounds K / V to
float16 first). Not yet measured on a GPU (QUAD_DECODE_CUDA_CORES=1 selects it).
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.kv_attention import _TARGETS, SM90  # noqa: F401
from kernels_tl.pdl import wait_for_producers

WARPS = 4
TOKENS_PER_WARP = 16
# Programs a SM the registers must allow (128 registers a thread; uncapped, group 4 x head_dim 128
# takes 168, three programs a SM).
MIN_BLOCKS = 4

_CC_SRC = r"""
#include <cuda_fp16.h>
// One warp's 16 tokens (tok0 .. tok0 + 15 of a cache block, the first `valid` of them inside the
// context) of one kv head: scores against the G queries in q_s (float32 [G, HD], pre-scaled to
// log2 units), the warp's online-softmax update of m / l (G each, replicated in every lane) and
// o (G x HD/32: this lane's output dimensions lane*HD/32 ..).
template <int G, int HD>
__device__ __forceinline__ void quad_cc_step(const float* q_s, const void* kd_v, const void* km_v,
                                             const void* vd_v, const void* vm_v, int tok0, int valid,
                                             float* m, float* l, float* o) {
  constexpr unsigned FULL = 0xffffffffu;
  constexpr int ROW = HD / 2;        // packed bytes per token row
  constexpr int DPL = HD / 32;       // output dimensions per lane
  const unsigned char* kd = reinterpret_cast<const unsigned char*>(kd_v);
  const unsigned char* vd = reinterpret_cast<const unsigned char*>(vd_v);
  const __half2* km = reinterpret_cast<const __half2*>(km_v);
  const __half2* vm = reinterpret_cast<const __half2*>(vm_v);
  const int lane = threadIdx.x & 31;
  const int t = lane & 15, h = lane >> 4;
  const int tok = tok0 + t;
  // All of this step's loads first: K half-row and K / V meta of token t, V bytes of 16 tokens.
  uint4 kw[HD / 64];
  const uint4* kp = reinterpret_cast<const uint4*>(kd + tok * ROW + h * (ROW / 2));
  #pragma unroll
  for (int c = 0; c < HD / 64; ++c) kw[c] = kp[c];
  const float2 ksz = __half22float2(km[tok]);
  const float2 vsz = __half22float2(vm[tok]);
  unsigned int vb[16];
  #pragma unroll
  for (int j = 0; j < 16; ++j) {
    const unsigned char* vp = vd + (tok0 + j) * ROW + lane * (DPL / 2);
    vb[j] = DPL == 4 ? (unsigned int)(*reinterpret_cast<const unsigned short*>(vp)) : (unsigned int)(*vp);
  }
  // Scores of token t over this lane's half of head_dim, then the other half's from lane t ^ 16.
  float s[G];
  #pragma unroll
  for (int r = 0; r < G; ++r) s[r] = 0.f;
  #pragma unroll
  for (int c = 0; c < HD / 64; ++c) {
    const unsigned int words[4] = {kw[c].x, kw[c].y, kw[c].z, kw[c].w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      #pragma unroll
      for (int b = 0; b < 4; ++b) {
        const unsigned int byte = (words[i] >> (8 * b)) & 0xffu;
        const float k0 = ((float)(byte & 15u) - ksz.y) * ksz.x;
        const float k1 = ((float)(byte >> 4) - ksz.y) * ksz.x;
        const int d = h * (HD / 2) + c * 32 + i * 8 + b * 2;
        #pragma unroll
        for (int r = 0; r < G; ++r) s[r] = fmaf(q_s[r * HD + d + 1], k1, fmaf(q_s[r * HD + d], k0, s[r]));
      }
    }
  }
  float p[G];
  #pragma unroll
  for (int r = 0; r < G; ++r) {
    float x = s[r] + __shfl_xor_sync(FULL, s[r], 16);
    x = t < valid ? x : -INFINITY;
    float mx = x;
    #pragma unroll
    for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, off));
    const float m_new = fmaxf(m[r], mx);
    const float pr = x == -INFINITY ? 0.f : exp2f(x - m_new);
    float sum = pr;
    #pragma unroll
    for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL, sum, off);
    const float rescale = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
    if (m_new != -INFINITY) {
      l[r] = l[r] * rescale + sum;
      #pragma unroll
      for (int d = 0; d < DPL; ++d) o[r * DPL + d] *= rescale;
      m[r] = m_new;
    }
    p[r] = pr;
  }
  // P·V over the valid tokens: token j's probability from lane j, its scale / zero from lane j.
  #pragma unroll
  for (int j = 0; j < 16; ++j) {
    if (j < valid) {
      const float sv = __shfl_sync(FULL, vsz.x, j), zv = __shfl_sync(FULL, vsz.y, j);
      float v[DPL];
      #pragma unroll
      for (int d = 0; d < DPL; ++d) v[d] = ((float)((vb[j] >> (4 * d)) & 15u) - zv) * sv;
      #pragma unroll
      for (int r = 0; r < G; ++r) {
        const float pj = __shfl_sync(FULL, p[r], j);
        #pragma unroll
        for (int d = 0; d < DPL; ++d) o[r * DPL + d] = fmaf(pj, v[d], o[r * DPL + d]);
      }
    }
  }
}

// This warp's state into red (shared, float32 [WARPS][G][2 + HD]: m, l, o).
template <int G, int HD>
__device__ __forceinline__ void quad_cc_publish(const float* m, const float* l, const float* o, float* red) {
  constexpr int DPL = HD / 32;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  #pragma unroll
  for (int r = 0; r < G; ++r) {
    float* slot = red + (w * G + r) * (2 + HD);
    if (lane == 0) { slot[0] = m[r]; slot[1] = l[r]; }
    #pragma unroll
    for (int d = 0; d < DPL; ++d) slot[2 + lane * DPL + d] = o[r * DPL + d];
  }
}

// The warps' states merged: op[r * op_stride + d] = o / l (0 for an empty split), lse[r * lse_stride]
// = log2(l) + m (-inf for an empty split).
template <int G, int HD, int WARPS>
__device__ __forceinline__ void quad_cc_merge(const float* red, float* op, int op_stride, float* lse, int lse_stride) {
  for (int idx = threadIdx.x; idx < G * HD; idx += WARPS * 32) {
    const int r = idx / HD, d = idx % HD;
    float top = -INFINITY;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) top = fmaxf(top, red[(w * G + r) * (2 + HD)]);
    float lsum = 0.f, acc = 0.f;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float* slot = red + (w * G + r) * (2 + HD);
      const float f = slot[0] == -INFINITY ? 0.f : exp2f(slot[0] - top);
      lsum += slot[1] * f;
      acc += slot[2 + d] * f;
    }
    op[r * op_stride + d] = lsum > 0.f ? acc / lsum : 0.f;
    if (d == 0) lse[r * lse_stride] = lsum > 0.f ? log2f(lsum) + top : -INFINITY;
  }
}
"""


def supports(heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
    """GQA groups of 1-8, head_dim 64 or 128, 64-token cache blocks (4 warps x 16 tokens)."""
    return heads % kv_heads == 0 and heads // kv_heads <= 8 and head_dim in (64, 128) and \
        block_size == WARPS * TOKENS_PER_WARP


@functools.lru_cache(maxsize=None)
def attention_decode_cc(heads: int, kv_heads: int, head_dim: int, num_splits: int, block_size: int = 64,
                        sm_scale: float | None = None, target=None):
    """kernel(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, out_partial, lse), the
    arguments and outputs of kv_attention.attention_decode."""
    assert supports(heads, kv_heads, head_dim, block_size), (heads, kv_heads, head_dim, block_size)
    group = heads // kv_heads
    half = head_dim // 2
    threads = WARPS * 32
    scale_log2 = (sm_scale if sm_scale is not None else head_dim ** -0.5) * math.log2(math.e)
    dpl = head_dim // 32

    @tilelang.jit(target=_TARGETS[target], pass_configs={"tl.disable_safe_memory_legalize": True})
    def build():
        b = T.dynamic("batch")
        nb = T.dynamic("num_blocks")
        width = T.dynamic("table_width")

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
                T.annotate_min_blocks_per_sm(MIN_BLOCKS)
                T.import_source(_CC_SRC)
                q_s = T.alloc_shared((group * head_dim,), "float32")
                red = T.alloc_shared((WARPS * group * (2 + head_dim),), "float32")
                m = T.alloc_local((group,), "float32")
                l = T.alloc_local((group,), "float32")
                o = T.alloc_local((group * dpl,), "float32")
                wait_for_producers("attention")
                tx = T.get_thread_binding()
                for i in T.serial(-(-(group * head_dim) // threads)):
                    idx = i * threads + tx
                    if idx < group * head_dim:
                        q_s[idx] = T.Cast("float32", Q[seq, kvh * group + idx // head_dim, idx % head_dim]) * T.float32(
                            scale_log2)
                for r in T.unroll(group):
                    m[r] = -T.infinity("float32")
                    l[r] = T.float32(0)
                for e in T.unroll(group * dpl):
                    o[e] = T.float32(0)
                T.sync_threads()
                ctx = LENS[seq]
                n_blocks = T.ceildiv(ctx, block_size)
                per_split = T.ceildiv(n_blocks, num_splits)
                first = split * per_split
                count = T.max(T.min(n_blocks - first, per_split), 0)
                tok0 = (tx // 32) * TOKENS_PER_WARP
                for it in T.serial(count):
                    phys = TABLES[seq, first + it]
                    valid = T.max(T.min(ctx - ((first + it) * block_size + tok0), TOKENS_PER_WARP), 0)
                    T.call_extern("handle", f"quad_cc_step<{group}, {head_dim}>", T.address_of(q_s[0]),
                                  T.address_of(KD[phys, kvh, 0, 0]), T.address_of(KM[phys, kvh, 0, 0]),
                                  T.address_of(VD[phys, kvh, 0, 0]), T.address_of(VM[phys, kvh, 0, 0]),
                                  tok0, valid, T.address_of(m[0]), T.address_of(l[0]), T.address_of(o[0]))
                # Every warp done with q_s before red is written (TileLang may place both in the same bytes).
                T.sync_threads()
                T.call_extern("handle", f"quad_cc_publish<{group}, {head_dim}>", T.address_of(m[0]),
                              T.address_of(l[0]), T.address_of(o[0]), T.address_of(red[0]))
                T.sync_threads()
                T.call_extern("handle", f"quad_cc_merge<{group}, {head_dim}, {WARPS}>", T.address_of(red[0]),
                              T.address_of(OP[seq, kvh * group, split, 0]), num_splits * head_dim,
                              T.address_of(LSE[seq, kvh * group, split]), num_splits)

        return main

    return build()
