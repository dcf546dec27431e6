"""Programmatic dependent launch (Hopper): a kernel's blocks may start while the kernel before it
in the stream is still running, and wait on the device, not on the host, for its results.

A decode step is ~430 small kernels; between two dependent launches the GPU idles about a
microsecond (the graph's launch latency plus the next kernel's ramp), which at batch 1 adds up to
a fifth of the step. A kernel built with `wait_for_producers()` is launched with the programmatic
stream-serialization attribute (TileLang sets it when the kernel contains a grid-dependency
sync); its blocks are scheduled as soon as the previous kernel's blocks have all triggered, and
block in `griddepcontrol.wait` until that kernel has finished and its writes are visible.

The call goes before the kernel's first global-memory access, so every read sees the previous
kernels' outputs and no write can land under a previous kernel that still reads that memory; the
trigger right after it lets the next kernel launch once this one is running (not earlier, so at
most one kernel waits on the SMs ahead of the one that runs). Kernels without the call (cuBLAS,
torch) are ordinary stream-ordered launches.

The tensor-core decode GEMMs (family gemm: TMA-fed, one large-shared-memory block per SM) are
built without it by default. Measured on an H200 in quad-bench (Llama-3-8B shapes, QUAD W4A4A8,
2026-11-30, one process per variant): decode b1 x 1024 2.73 ms/step without PDL, 2.42 with it on
every family, 2.50 with it on all but gemm; b32 x 1024 6.07 without, 7.02 on every family, 6.10 on
all but gemm (6.85-7.20 when skipping norm + hadamard_quant, or kv_store + attention, instead):
early-launched decode GEMMs cost more than they save at 32 tokens (not yet explained).

Switches, read when kernels_tl is imported: QUAD_PDL=0 builds every kernel without it;
QUAD_PDL_SKIP=family,... builds those kernel families without it (default: gemm); QUAD_PDL_LATE=family,... lets
them wait but not trigger early (the next kernel launches when they exit). Families: norm,
hadamard_quant, gemm (the tensor-core decode GEMMs and split-K epilogue), gemv (the CUDA-core GEMV
of 1-4 tokens), head (the int8 lm_head GEMV), kv_store, attention.
"""

import os

import tilelang.language as T

ENABLED = os.environ.get("QUAD_PDL", "1") != "0"
FAMILIES = ("norm", "hadamard_quant", "gemm", "gemv", "head", "kv_store", "attention")


def _families(var: str, default: str = "") -> frozenset:
    names = frozenset(name for name in os.environ.get(var, default).split(",") if name)
    unknown = names - set(FAMILIES)
    if unknown:
        raise ValueError(f"{var}: unknown kernel families {sorted(unknown)} (known: {', '.join(FAMILIES)})")
    return names


SKIP = _families("QUAD_PDL_SKIP", "gemm")
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
