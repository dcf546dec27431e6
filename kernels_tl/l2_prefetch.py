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

Where no kernel of ours precedes the GEMM closely enough to carry the blocks (the o_proj and
down_proj inputs' quantizers come in many variants), `l2_prefetch_kernel` is the same prefetch as
a kernel of its own, placed in the stream early (after the GEMM before, so its fetches find the
DRAM idle): it waits for the previous kernel, lets the next one launch at once (programmatic
dependent launch), issues its pieces and exits, so the next kernel's start moves by the time it
takes to issue them, not by a launch.
"""

import functools
import os
import re

import tilelang
import tilelang.language as T

from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# The switches (read at import): MiB of a GEMM's packed weights asked for (0: off, the default
# until an engine A/B shows it pays), the blocks that ask (0: one a SM), and the sites: "norm" (the
# layers' norms, for qkv and gate_up), "o" (a kernel after the qkv GEMM, for o_proj), "down" (a
# kernel after the gate_up GEMM, for down_proj), separated by "," or "+".
MB = float(os.environ.get("QUAD_L2_PREFETCH_MB", "0"))
BLOCKS = int(os.environ.get("QUAD_L2_PREFETCH_BLOCKS", "0"))
SITES = frozenset(re.split(r"[,+]", os.environ.get("QUAD_L2_PREFETCH_SITES", "norm,o,down"))) - {""}
if not SITES <= {"norm", "o", "down"}:
    raise ValueError(f"QUAD_L2_PREFETCH_SITES: unknown sites {sorted(SITES - {'norm', 'o', 'down'})} "
                     "(known: norm, o, down)")
# Token counts up to which a step prefetches (decode steps; prefill GEMMs are compute bound).
MAX_TOKENS = 64


def enabled(site: str, tokens: int) -> bool:
    """Whether a step of `tokens` tokens prefetches at this site."""
    return MB > 0 and site in SITES and 0 < tokens <= MAX_TOKENS


def prefetch_bytes(weights):
    """The bytes of `weights` to ask for (uint8, 1-D view): the first MB MiB, a multiple of 16;
    None where the tensor is not 16-byte aligned or not contiguous."""
    import torch

    if not weights.is_contiguous() or weights.data_ptr() % 16:
        return None
    flat = weights.reshape(-1).view(torch.uint8)
    nbytes = min(flat.numel(), int(MB * (1 << 20))) // 16 * 16
    return flat[:nbytes] if nbytes else None


def prefetch_blocks(device=None) -> int:
    """Blocks that ask: BLOCKS, or one a SM of the device."""
    return BLOCKS or _sm_count(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count


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


@functools.lru_cache(maxsize=None)
def l2_prefetch_kernel(blocks: int, threads: int = 128, target=None):
    """kernel(PF): ask for all of PF's bytes (uint8 1-D, 16-byte aligned, a multiple of 16 long) in
    L2 from `blocks` blocks; writes nothing."""

    @tilelang.jit(target=TARGETS[target])
    def build():
        pn = T.dynamic("pn")

        @T.prim_func
        def main(PF: T.Tensor((pn,), "uint8")):
            with T.Kernel(blocks, threads=threads) as bx:
                wait_for_producers("l2_prefetch")
                T.import_source(PREFETCH_SRC)
                prefetch_share(PF, pn, bx, blocks, threads)

        return main

    return build()


def l2_prefetch_op(weights) -> None:
    """Run l2_prefetch_kernel on the first MB MiB of `weights` (nothing where prefetch_bytes has none)."""
    pf = prefetch_bytes(weights)
    if pf is not None:
        l2_prefetch_kernel(prefetch_blocks(weights.device))(pf)
