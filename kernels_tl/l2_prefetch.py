"""L2 prefetch of the next GEMM's weights by the small kernels before it (decode steps).

A decode step alternates weight-streaming GEMMs with small latency-bound kernels (norms,
quantizers, attention at a short context): at batch 1 those take ~0.8 ms of a ~2 ms step, and the
DRAM is idle under them. A kernel built with `prefetch_blocks` > 0 runs that many extra blocks which
only ask the memory system to bring bytes of a tensor it is handed (the next GEMM's packed weights,
from their start: the rows the GEMM's first blocks read first) into L2, with
`cp.async.bulk.prefetch.L2` (sm_90: one instruction a piece, no data back to the SM, no completion
to wait for), and exit. The kernel's own blocks (indices below its usual grid) are unchanged, so
its outputs are bit-identical with and without; the next GEMM then finds those bytes in L2.

The prefetch blocks wait for the previous kernel like the others: launched early under
programmatic dependent launch, their fetches would compete with the previous GEMM's weight stream
and could be evicted by it before use.
"""

import tilelang.language as T

PREFETCH_SRC = r"""
// Ask for [p, p + bytes) in L2 (a hint: no data comes back, nothing to wait for).
// p 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void quad_prefetch_l2(const void* p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
}
"""

# Bytes one bulk prefetch asks for: small enough that a few MB spread over many blocks (each SM's
# TMA unit issues its own), large enough that a block issues only a few.
PIECE = 16384


@T.macro
def prefetch_share(PF, total, part, parts: int, threads: int):
    """Issue this block's share of the prefetch of PF's first `total` bytes (PF uint8 1-D, 16-byte
    aligned; total a multiple of 16): the pieces are dealt to `parts` blocks, `part` being this one's
    index among them, and to its threads. Called inside a kernel body, after T.import_source of
    PREFETCH_SRC."""
    tx = T.get_thread_binding()
    pieces = T.ceildiv(total, PIECE)
    per_part = T.ceildiv(pieces, parts)
    for i in T.serial(T.ceildiv(per_part, threads)):
        local = i * threads + tx
        piece = part * per_part + local
        if local < per_part and piece < pieces:
            start = piece * PIECE
            T.call_extern("handle", "quad_prefetch_l2", T.address_of(PF[start]),
                          T.Cast("uint32", T.min(total - start, PIECE)))
