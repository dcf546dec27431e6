"""Online Hadamard + per-token quantization for thousands of tokens: persistent blocks that stream
the token rows through shared memory.

`hadamard_quant` gives each token row one block, which loads the row from global memory, waits for
it, transforms it and exits. At thousands of tokens that leaves the loads exposed: each block's
latency is load, then compute, with ~3 blocks a SM to overlap them (the gated 14336-wide
down_proj input at 2048 tokens on an H200, Nsight Compute: 15% of DRAM bandwidth, 32% of issue
slots busy, 65% of cycles with no eligible warp).

Here a fixed grid of `blocks` blocks walks the tokens (token bx, bx + blocks, ...). Each block
copies its next row into a shared-memory buffer with cp.async as soon as the current row has been
read out of it, so the copy runs under the current row's butterfly passes, reduction and
quantization. The transform itself is `hadamard_quant`'s default one (its layout, its swizzled
butterfly passes, the same float32 operations in the same order), so the codes and scales are
those of `hadamard_quant` with its default launch shape, bit for bit.

Shared memory a block: the float16 input row (2n for gated) and the float32 row; 2 blocks a SM
for the gated 14336-wide row (112 KB each).
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.hadamard_rows import _butterfly_pass, _layout, _row_transform
from kernels_tl.pdl import wait_for_producers
from kernels_tl.quantize import _PASS_CONFIGS, _qmax
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

# cp.async of 16 bytes, global to shared, bypassing L1 (.cg): the rows are read once.
_CP_ASYNC_SRC = r"""
__device__ __forceinline__ void quad_cp_async16(void* dst, const void* src) {
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void quad_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void quad_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
"""

SHARED_BYTES_PER_SM = 228 * 1024  # H100 / H200: 228 KB a SM, 1 KB of it reserved per resident block
REGISTERS_PER_SM = 65536
MAX_REGISTERS = 128  # what the 14336-wide row's kernel takes (ptxas) at 2 blocks a SM


def blocks_per_sm(n: int, factors, block, gated: bool) -> int:
    """Resident blocks a SM: as many as the two shared rows allow, at most as many as leave each
    thread MAX_REGISTERS, at most 8."""
    threads = _layout(n, tuple(factors), block).threads
    shared = (2 * n if gated else n) * 2 + (n + threads // 32) * 4 + 1024
    return max(1, min(SHARED_BYTES_PER_SM // shared, REGISTERS_PER_SM // (threads * MAX_REGISTERS), 8))


def stream_fits(n: int, factors, block, gated: bool) -> bool:
    """Rows the streaming kernel is for: one Hadamard over the whole row, a dense factor of at most
    32 (its sums in registers), and at least 2 blocks a SM (one block alone waits at every barrier:
    Qwen2.5-7B's gated 18944-wide row, with its 148-point factor, does not fit twice)."""
    lay = _layout(n, tuple(factors), block)
    return lay.nb == 1 and lay.f <= 32 and blocks_per_sm(n, factors, block, gated) >= 2


def stream_blocks(n: int, factors, block, gated: bool) -> int:
    """The grid the dispatch launches: blocks_per_sm a SM of the GPU this process sees."""
    import torch
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return blocks_per_sm(n, factors, block, gated) * sms


@T.macro
def _copy_row(R, X, tok, tx, threads: int, width: int):
    """Start the cp.async copy of X[tok] (width float16) into R [1, width]: 16 bytes a thread at a time."""
    chunks = width // 8
    for kk in T.serial(-(-chunks // threads)):
        c = kk * threads + tx
        if chunks % threads == 0 or c < chunks:
            T.call_extern("handle", "quad_cp_async16", T.address_of(R[0, c * 8]), T.address_of(X[tok, c * 8]))
    T.call_extern("handle", "quad_cp_async_commit")


@functools.lru_cache(maxsize=None)
def _hadamard_quant_stream(n: int, factors: tuple, block, bits: int, clip: float, target, blocks: int,
                           gated: bool, fast_silu: bool):
    _qmax(bits)
    lay = _layout(n, factors, block)
    f, cpt, threads, plan = lay.f, lay.cpt, lay.threads, lay.plan
    warps = threads // 32
    width = 2 * n if gated else n
    resident = blocks_per_sm(n, factors, block, gated)
    assert width % 8 == 0, "rows are copied 16 bytes at a time"
    rt = _row_transform(n, lay, bits, clip, gated, fast_silu)

    @tilelang.jit(target=TARGETS[target], pass_configs=_PASS_CONFIGS)
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            X: T.Tensor((m, width), "float16"),
            XQ: T.Tensor((m, n), "int8"),
            XS: T.Tensor((m,), "float32"),
        ):
            with T.Kernel(blocks, threads=threads) as bx:
                T.import_source(_CP_ASYNC_SRC)
                T.annotate_min_blocks_per_sm(resident)
                wait_for_producers("hadamard_quant")
                tx = T.get_thread_binding()
                R = T.alloc_shared((1, width), "float16")  # the input row, filled by cp.async
                S = T.alloc_shared((n + warps,), "float32")  # the row in float32 (swizzled), then reduction slots
                xin = T.alloc_local((f, cpt), "float32")
                tot = T.alloc_local((cpt,), "float32")
                comb = T.alloc_local((cpt, max(rt.quads, 1), 8), "float32")
                ya = T.alloc_local((cpt,), "float32")
                yb = T.alloc_local((cpt,), "float32")
                fa = T.alloc_local((rt.per_thread * rt.group,), "float32")
                fb = T.alloc_local((rt.per_thread * rt.group,), "float32")

                if bx < m:
                    _copy_row(R, X, bx, tx, threads, width)
                for it in T.serial(T.ceildiv(T.max(m - bx, 0), blocks)):
                    tok = bx + it * blocks
                    T.call_extern("handle", "quad_cp_async_wait_all")
                    T.sync_threads()
                    rt.load(R, 0, S, xin, tot, comb, ya, yb, tx)  # phase 1 of hadamard_quant, from R
                    T.sync_threads()
                    # R has been read: the next row's copy runs under the rest of this one.
                    if tok + blocks < m:
                        _copy_row(R, X, tok + blocks, tx, threads, width)
                    for stride, radix, lo in plan[:-1]:
                        _butterfly_pass(S, tx, threads, n, stride, radix, lo)
                        T.sync_threads()
                    rt.quantize(S, fa, fb, XQ, XS, tok, tx)

        return main

    return build()


def hadamard_quant_stream(n: int, factors, block, bits: int, clip: float, blocks: int, target=None,
                          gated: bool = False, fast_silu: bool = False):
    """Build (and cache) the streaming variant of `hadamard_quant` for a grid of `blocks` blocks
    (a multiple of the SM count: blocks_per_sm(n, gated) a SM). Same call, kernel(X, XQ, XS), same
    outputs as `hadamard_quant` with its default launch shape."""
    return _hadamard_quant_stream(int(n), tuple(int(f) for f in factors), None if block is None else int(block),
                                  int(bits), float(clip), target, int(blocks), bool(gated), bool(fast_silu))
