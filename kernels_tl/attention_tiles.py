"""The pieces both paged int4 attention kernels (`kv_attention.py` decode, `attention_prefill.py`)
are made of: dequantization of a cache block to float16 (through shared memory, or from registers
with the next block prefetched), the program's buffers and the online-softmax step.
"""

import tilelang.language as T


DEQUANT_SRC = r"""
// 4 packed cache bytes (8 int4 codes, low nibble first) -> 8 float16 (q - zero) * scale, one 16-byte
// store. Each byte becomes the half2 (0x6400 | lo, 0x6400 | hi) = (1024 + lo, 1024 + hi); subtracting
// 1024 is exact, and (q - zero) * scale rounded once to float16 is the reference's dequantization
// (its float32 product of a 5-bit difference and a float16 scale is exact before that rounding).
#include <cuda_fp16.h>
__device__ __forceinline__ void quad_kv_dequant8(const void* src, const void* meta, void* dst) {
  const unsigned int w = *reinterpret_cast<const unsigned int*>(src);
  const half2 sz = *reinterpret_cast<const half2*>(meta);
  const half2 scale = __low2half2(sz);
  const half2 zero = __high2half2(sz);
  const half2 bias = __float2half2_rn(1024.0f);
  uint4 out;
  unsigned int* o = reinterpret_cast<unsigned int*>(&out);
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned int t = w >> (8 * i);
    unsigned int x = (t & 0xFu) | ((t & 0xF0u) << 12) | 0x64006400u;
    const half2 h = __hmul2(__hsub2(__hsub2(*reinterpret_cast<half2*>(&x), bias), zero), scale);
    o[i] = *reinterpret_cast<const unsigned int*>(&h);
  }
  *reinterpret_cast<uint4*>(dst) = out;
}
"""


@T.macro
def dequant_tile(packed, scale, zero, out, block_size: int, head_dim: int):
    """out[j, d] = float16((nibble d of token j - zero(j)) · scale(j)), the cache's dequantization;
    scale and zero are functions of the token j (a shared tile's column or the global meta)."""
    for j, d in T.Parallel(block_size, head_dim):
        nib = (packed[j, d // 2] >> T.Cast("uint8", (d % 2) * 4)) & T.uint8(15)
        out[j, d] = T.Cast("float16", (T.Cast("float32", nib) - T.Cast("float32", zero(j)))
                           * T.Cast("float32", scale(j)))


@T.macro
def load_kv_block(KD, KM, VD, VM, phys, kvh, kp_s, km_s, vp_s, vm_s, k_s, v_s, block_size: int, head_dim: int,
                   num_stages: int):
    """Cache block `phys` of kv head `kvh` into k_s / v_s as float16. Pipelined loops (num_stages >
    1) read scale and zero from global memory: their [64, 2] tiles are too narrow for the copy
    engine, and plain stores into a pipelined stage are not ordered against its barriers."""
    if num_stages == 1:
        T.copy(KD[phys, kvh, :, :], kp_s)
        T.copy(KM[phys, kvh, :, :], km_s)
        T.copy(VD[phys, kvh, :, :], vp_s)
        T.copy(VM[phys, kvh, :, :], vm_s)
        dequant_tile(kp_s, lambda j: km_s[j, 0], lambda j: km_s[j, 1], k_s, block_size, head_dim)
        dequant_tile(vp_s, lambda j: vm_s[j, 0], lambda j: vm_s[j, 1], v_s, block_size, head_dim)
    else:
        T.copy(KD[phys, kvh, :, :], kp_s)
        T.copy(VD[phys, kvh, :, :], vp_s)
        dequant_tile(kp_s, lambda j: KM[phys, kvh, j, 0], lambda j: KM[phys, kvh, j, 1], k_s, block_size, head_dim)
        dequant_tile(vp_s, lambda j: VM[phys, kvh, j, 0], lambda j: VM[phys, kvh, j, 1], v_s, block_size, head_dim)


def attention_buffers(rows: int, block_size: int, head_dim: int):
    """The buffers of one attention program, decode and prefill alike: the query rows, one cache
    block packed (codes, scale / zero) and dequantized, the scores and probabilities, the output
    and the online-softmax state (row maxima, rescale factors, running and block sums)."""
    half = head_dim // 2
    return (T.alloc_shared((rows, head_dim), "float16"),
            T.alloc_shared((block_size, half), "uint8"), T.alloc_shared((block_size, half), "uint8"),
            T.alloc_shared((block_size, 2), "float16"), T.alloc_shared((block_size, 2), "float16"),
            T.alloc_shared((block_size, head_dim), "float16"), T.alloc_shared((block_size, head_dim), "float16"),
            T.alloc_fragment((rows, block_size), "float32"),
            T.alloc_shared((rows, block_size), "float16"),  # probabilities, re-laid out for P·V
            T.alloc_fragment((rows, head_dim), "float32"),
            *(T.alloc_fragment((rows,), "float32") for _ in range(5)))


@T.macro
def softmax_pv(s, m, m_prev, rescale, l, l_blk, o, p_s, v_s, rows: int, block_size: int, head_dim: int):
    """The online-softmax step after the masked, log2-scaled scores s of one block: new row maxima,
    rescale of the running sum l and output o, then o += P·V."""
    T.copy(m, m_prev)
    T.reduce_max(s, m, dim=1, clear=False)
    for i in T.Parallel(rows):
        rescale[i] = T.exp2(m_prev[i] - m[i])
    for i, j in T.Parallel(rows, block_size):
        s[i, j] = T.exp2(s[i, j] - m[i])
    T.reduce_sum(s, l_blk, dim=1)
    for i in T.Parallel(rows):
        l[i] = l[i] * rescale[i] + l_blk[i]
    for i, d in T.Parallel(rows, head_dim):
        o[i, d] = o[i, d] * rescale[i]
    T.copy(s, p_s)
    T.gemm(p_s, v_s, o, policy=T.GemmWarpPolicy.FullCol)


def prefetch_macros(threads: int, block_size: int, head_dim: int):
    """The register-prefetch loop for a block of `threads` threads, built of two steps: fetch loads
    this thread's bytes of a cache block (and its row's scale / zero) into registers; dequant_regs
    writes them dequantized into the float16 tiles (quad_kv_dequant8). Returns (packed bytes per
    thread, prefetch_loop)."""
    half = head_dim // 2
    threads_per_row = threads // block_size
    per_thread = half // max(threads_per_row, 1)

    @T.macro
    def fetch(phys, kvh, KD, KM, VD, VM, k_reg, v_reg, k_meta, v_meta):
        """This thread's bytes of cache block `phys` (and its row's scale / zero) into registers."""
        tx = T.get_thread_binding()
        j, part = tx // threads_per_row, tx % threads_per_row
        for c in T.vectorized(per_thread):
            k_reg[c] = KD[phys, kvh, j, part * per_thread + c]
        for c in T.vectorized(per_thread):
            v_reg[c] = VD[phys, kvh, j, part * per_thread + c]
        for c in T.vectorized(2):
            k_meta[c] = KM[phys, kvh, j, c]
        for c in T.vectorized(2):
            v_meta[c] = VM[phys, kvh, j, c]

    @T.macro
    def dequant_regs(k_reg, v_reg, k_meta, v_meta, k_s, v_s):
        tx = T.get_thread_binding()
        j, part = tx // threads_per_row, tx % threads_per_row
        for c in T.unroll(per_thread // 4):
            col = (part * per_thread + 4 * c) * 2
            T.call_extern("handle", "quad_kv_dequant8", T.address_of(k_reg[4 * c]), T.address_of(k_meta[0]),
                          T.address_of(k_s[j, col]))
            T.call_extern("handle", "quad_kv_dequant8", T.address_of(v_reg[4 * c]), T.address_of(v_meta[0]),
                          T.address_of(v_s[j, col]))
        # Plain stores the tensor cores read next: into the async proxy, then every thread's.
        T.fence_proxy_async()
        T.sync_threads()

    @T.macro
    def prefetch_loop(count, block_at, kvh, KD, KM, VD, VM, k_s, v_s, update):
        """For it in [0, count): cache block block_at(it) of kv head kvh into k_s / v_s, then
        update(it) (the scores, softmax and P·V of that block), the next block's packed bytes in
        registers meanwhile."""
        T.import_source(DEQUANT_SRC)
        k_reg = T.alloc_local((per_thread,), "uint8")
        v_reg = T.alloc_local((per_thread,), "uint8")
        k_meta = T.alloc_local((2,), "float16")
        v_meta = T.alloc_local((2,), "float16")
        if count > 0:
            fetch(block_at(0), kvh, KD, KM, VD, VM, k_reg, v_reg, k_meta, v_meta)
        for it in T.serial(count):
            dequant_regs(k_reg, v_reg, k_meta, v_meta, k_s, v_s)
            if it + 1 < count:  # in flight while this block is multiplied
                fetch(block_at(it + 1), kvh, KD, KM, VD, VM, k_reg, v_reg, k_meta, v_meta)
            update(it)
            T.sync_threads()  # k_s / v_s are rewritten at the top of the next block

    return per_thread, prefetch_loop
