"""Programmatic dependent launch (Hopper): a kernel's blocks may start while the kernel before it
in the stream is still running, and wait on the device, not on the host, for its results.

A decode step is ~430 small kernels; between two dependent launches the GPU idles about a
microsecond (the graph's launch latency plus the next kernel's ramp), which at batch 1 adds up to
a fifth of the step. A kernel built with `wait_for_producers()` is launched with the programmatic
stream-serialization attribute (TileLang sets it when the kernel contains a grid-dependency
sync); its blocks are scheduled as soon as the previous kernel's blocks have all triggered, and
block in `griddepcontrol.wait` until that kernel has finished and its writes are visible.

The call goes before the kernel's first global-memory access, so every read sees the previous
kernels' outputs and no write can land under a previous kernel that still reads that memory (the
one exception: the GEMV requests its first weight chunks before it, see prefetch_weights); the
trigger right after it lets the next kernel launch once this one is running (not earlier, so at
most one kernel waits on the SMs ahead of the one that runs). Kernels without the call (cuBLAS,
torch) are ordinary stream-ordered launches. TileLang drops __restrict__ from the pointers of a
kernel with the call, so that no read-only-cache load is hoisted above the wait.

The tensor-core decode GEMMs (family gemm: TMA-fed, one large-shared-memory block per SM) are
built without it by default. Measured on an H200 in quad-bench (Llama-3-8B shapes, QUAD W4A4A8,
2026-11-30, one process per variant, variants compared within one call:
bench/results/pdl_ab_h200_2026-11-30.json): decode b1 x 1024 2.67-2.73 ms/step without PDL,
2.42-2.45 with it on every family; b32 x 1024 6.07 without, 6.92-7.02 on every family, 6.85-7.20
when skipping norm + hadamard_quant, or kv_store + attention, 6.10 when skipping gemm alone (b1
2.50 in that call): early-launched decode GEMMs cost more than they save at 32 tokens (why is not
established).

Switches, read when kernels_tl is imported: QUAD_PDL=0 builds every kernel without it;
QUAD_PDL_SKIP=family,... builds those kernel families without it (default: gemm,gemm_epilogue);
QUAD_PDL_LATE=family,... lets them wait but not trigger early (the next kernel launches when they
exit); QUAD_PDL_PREFETCH=0 keeps the GEMV from requesting its first weights before the wait.
Families: norm, hadamard_quant, gemm (the tensor-core decode GEMMs), gemm_epilogue (the split-K
GEMMs' epilogue kernel: skipped by default with gemm, as measured; QUAD_PDL_SKIP=gemm gives it PDL
alone, unmeasured, and since split-K sums without outliers or bias go to the next norm
(gemm_dispatch.SplitKSums) a Llama decode step no longer runs it), gemv (the CUDA-core GEMV of
1-4 tokens), head (the int8 lm_head GEMV), kv_store, attention, l2_prefetch (kernels_tl.l2_prefetch's
kernel, which only asks for weights in L2).
"""

import os

import tilelang.language as T

ENABLED = os.environ.get("QUAD_PDL", "1") != "0"
FAMILIES = ("norm", "hadamard_quant", "gemm", "gemm_epilogue", "gemv", "head", "kv_store", "attention", "l2_prefetch")


def _families(var: str, default: str = "") -> frozenset:
    names = frozenset(name for name in os.environ.get(var, default).split(",") if name)
    unknown = names - set(FAMILIES)
    if unknown:
        raise ValueError(f"{var}: unknown kernel families {sorted(unknown)} (known: {', '.join(FAMILIES)})")
    return names


SKIP = _families("QUAD_PDL_SKIP", "gemm,gemm_epilogue")
LATE = _families("QUAD_PDL_LATE")


@T.macro
def _sync_then_trigger():
    T.pdl_sync()
    T.pdl_trigger()


@T.macro
def _sync():
    T.pdl_sync()


def enabled(family: str) -> bool:
    assert family in FAMILIES, family
    return ENABLED and family not in SKIP


def wait_for_producers(family: str):
    """Emit, at the top of a kernel body, the wait for the previous kernel and the trigger for the
    next (nothing where the switches above turn it off for this kernel family)."""
    if enabled(family):
        if family in LATE:
            _sync()
        else:
            _sync_then_trigger()


def prefetch_weights(family: str) -> bool:
    """Whether a kernel of this family requests its first weight chunks before the wait: weights are
    never written during a step, so those loads are safe before it, and they overlap the previous
    kernel's tail (the point of launching early)."""
    return enabled(family) and os.environ.get("QUAD_PDL_PREFETCH", "1") != "0"
