"""Which Hadamard + quantize kernel runs a problem, and the call (`hadamard_quant_op`, the entry point
of the dispatch layer): a thread-block cluster per token row for a few tokens and for thousands
where the row has a dense factor (kernels_tl.hadamard_quant_cluster), else one block per row
(kernels_tl.hadamard_quant) in a launch shape chosen by the token count. `prebuild_jobs` lists
every kernel a set of token counts will use, so an engine can compile them in parallel before its
first steps.
"""

import functools
import os

from kernels_tl.hadamard_quant import hadamard_quant
from kernels_tl.hadamard_quant_cluster import cluster_layout, hadamard_quant_cluster

# Up to this many tokens a row with a dense factor is split over a thread-block cluster
# (kernels_tl.hadamard_quant_cluster): one block per token leaves all but M SMs idle while the
# dense product keeps each busy. Measured on an H200 (bench/sweeps.py --hadamard,
# 2026-11-30), the gated 14336-wide down_proj input of Llama-3-8B: 5.8 µs at M = 1 and 4 (8-block
# clusters) against 17.4 / 18.4 µs, 6.9 µs at M = 16 and 9.9 at M = 32 (4-block clusters) against
# 18.3 / 18.7; at M = 64 one block per token is faster. Rows without a dense factor (4096 wide:
# 2.5 µs at M = 1) gain nothing.
CLUSTER_MAX_TOKENS = 32
# Above that, up to this many tokens, one block per token with 512 threads of one column each and
# 4-bit butterfly passes: 11.7 µs at M = 64 against 18.8 for the default shape (same sweep; the
# default is tuned for thousands of tokens, where 512 threads a block were 35% slower).
FEW_TOKENS_MAX = 64
FEW_TOKENS_SHAPE = dict(threads=512, cols_per_thread=1, max_radix=4)
# From this many tokens (a prefill) a dense row of at least LARGE_ROW_MIN goes to 2-block clusters of
# 256 threads again: the one-block kernel holds the float32 row in shared memory (57 KB at 14336),
# 3 rows a SM, and waits on latency (Nsight Compute at 2048 tokens: 15% of DRAM bandwidth, 35%
# occupancy); half a row a block keeps more in flight. The gated 14336-wide input at M = 2048 on an
# H200 (bench/sweeps.py --hadamard, 2026-12-01): 161.6 µs against 204.1 (4-block clusters 245), the
# same codes as the default but for 3 in a million (ties rounded after another summation order);
# their GPU tests against the reference pass (2053 tokens). Unmeasured between 65 and 2047.
LARGE_TOKENS_MIN = 2048
LARGE_ROW_MIN = 8192
LARGE_CLUSTER = (2, 256)
# The gated kernels that prefills run (the one-block default and the 2-block clusters) compute silu
# from the approximate exp and reciprocal (hadamard_quant._swiglu_f16): about half the kernel's
# instructions at thousands of tokens; a 16 x 2048 Llama-3-8B prefill 612.5 against 619.2 ms
# (bench/results/prefill_ab_h200_2026-12-01.json), codes within the quantizer tolerance of the
# reference (tests/test_quantize_gpu.py). The cluster and few-token kernels of decode sizes wait on
# latency, not on silu, and keep the exact one. QUAD_FAST_SILU=0: the exact silu everywhere.
FAST_SILU = os.environ.get("QUAD_FAST_SILU", "1") == "1"


def _cluster_shape(m: int) -> tuple[int, int]:
    """(blocks per cluster, threads per block) of the cluster variant at m tokens."""
    return (8, 256) if m <= 4 else (4, 512) if m <= 16 else (4, 256)


def kernel_choice(m: int, n: int, factors: tuple, block) -> tuple:
    """Which kernel `hadamard_quant_op` runs at m tokens: ("cluster", blocks, threads), ("few",) or
    ("default",). Token counts with the same choice share one compiled kernel."""
    if m >= LARGE_TOKENS_MIN and n >= LARGE_ROW_MIN:
        layout = cluster_layout(n, tuple(factors), block, LARGE_CLUSTER[0])
        return ("cluster", *LARGE_CLUSTER) if layout is not None and layout[0] > 1 else ("default",)
    cluster, threads = _cluster_shape(m)
    layout = cluster_layout(n, tuple(factors), block, cluster)
    dense = layout is not None and layout[0] > 1
    if m <= CLUSTER_MAX_TOKENS and dense:
        return ("cluster", cluster, threads)
    if m <= FEW_TOKENS_MAX and dense and layout[1] >= FEW_TOKENS_SHAPE["threads"]:
        return ("few",)
    return ("default",)


def build_choice(choice: tuple, n: int, factors: tuple, block, bits: int, clip: float, gated: bool):
    """The compiled kernel of a kernel_choice (built on first use, then cached)."""
    prefill_kernel = choice == ("default",) or choice == ("cluster", *LARGE_CLUSTER)
    fast = {"fast_silu": True} if gated and FAST_SILU and prefill_kernel else {}
    if choice[0] == "cluster":
        return hadamard_quant_cluster(n, factors, bits, clip, cluster=choice[1], threads=choice[2], gated=gated, **fast)
    if choice[0] == "few":
        return hadamard_quant(n, factors, block, bits, clip, gated=gated, **FEW_TOKENS_SHAPE, **fast)
    return hadamard_quant(n, factors, block, bits, clip, gated=gated, **fast)


def prebuild_jobs(problems, token_counts) -> list:
    """One build per kernel hadamard_quant_op picks for the (n, factors, block, bits, clip, gated)
    problems at the given token counts: thunks for a thread pool (TileLang compiles through nvcc
    subprocesses, so threads overlap); an engine runs them before capturing its decode steps."""
    jobs = {(kernel_choice(m, n, tuple(factors), block), n, tuple(factors), block, bits, float(clip), bool(gated))
            for n, factors, block, bits, clip, gated in problems for m in token_counts}
    return [functools.partial(build_choice, *job) for job in sorted(jobs, key=repr)]


def hadamard_quant_op(x, factors, block, bits: int, clip: float, gated: bool = False):
    """(x_q int8 [.., n], x_scale float32 [.., 1]) of apply_hadamard(x) quantized per token; with
    gated, x is gate_up [.., 2n] and the transform runs on silu(gate) * up."""
    import torch

    lead, n = x.shape[:-1], x.shape[-1] // (2 if gated else 1)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float16).contiguous()
    m = x2.shape[0]
    factors = tuple(factors)
    kernel = build_choice(kernel_choice(m, n, factors, block), n, factors, block, bits, float(clip), gated)
    x_q = torch.empty(m, n, dtype=torch.int8, device=x.device)
    x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        kernel(x2, x_q, x_scale)
    return x_q.reshape(*lead, n), x_scale.reshape(*lead, 1)
