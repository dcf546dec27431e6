"""Which Hadamard + quantize kernel runs a problem, and the call (`hadamard_quant_op`, the entry point
of the dispatch layer): a thread-block cluster per token row for a few tokens where the row has a
dense factor (kernels_tl.hadamard_quant_cluster), persistent streaming blocks for the gated rows of
a prefill (kernels_tl.hadamard_quant_stream; with the dense factor on the tensor cores where it
fits, kernels_tl.hadamard_quant_mma), two register passes for square plain rows where switched on
(kernels_tl.hadamard_quant_square), else one block per row (kernels_tl.hadamard_quant) in a launch
shape chosen by the token count. `prebuild_jobs` lists
every kernel a set of token counts will use, so an engine can compile them in parallel before its
first steps.
"""

import functools
import os

from kernels_tl.hadamard_quant import hadamard_quant
from kernels_tl.hadamard_quant_cluster import cluster_layout, hadamard_quant_cluster
from kernels_tl.hadamard_quant_mma import hadamard_quant_mma, mma_fits
from kernels_tl.hadamard_quant_square import hadamard_quant_square, square_fits
from kernels_tl.hadamard_quant_stream import hadamard_quant_stream, stream_blocks, stream_fits

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
# The gated kernels that prefills run (the one-block default and the streaming one) compute silu
# from the approximate exp and reciprocal (hadamard_rows._swiglu_f16): about half the kernel's
# instructions at thousands of tokens; a 16 x 2048 Llama-3-8B prefill 612.5 against 619.2 ms
# (bench/results/prefill_ab_h200_2026-12-01.json), codes within the quantizer tolerance of the
# reference (tests/test_quantize_gpu.py). The cluster and few-token kernels of decode sizes wait on
# latency, not on silu, and keep the exact one. QUAD_FAST_SILU=0: the exact silu everywhere.
FAST_SILU = os.environ.get("QUAD_FAST_SILU", "1") == "1"
# From this many tokens a gated row that fits twice a SM (Llama-3-8B's 14336) goes to persistent
# blocks that copy the next row into shared memory under the current one
# (kernels_tl.hadamard_quant_stream). On an H200 (bench/sweeps.py --hadamard-stream, 2026-12-02),
# gated 14336: 28.8 against 30.7 µs for the default at M = 512, 48.5 / 52.8 at 1024, 87.8 / 94.0 at
# 2048, 317.5 / 328.7 at 8192; slower at 256 (19.1 / 17.5). Plain rows gain nothing (14336:
# 66.0 / 62.0 µs at 2048; 4096: 20.9 / 19.1 with 4 blocks a SM). The 2-block clusters this
# dispatch used from 2048 tokens took 145.2 µs in that run (plain 14336: 109.7 against 62.0), so
# a long prefill no longer splits rows. QUAD_HADAMARD_STREAM_MIN=0: never stream.
STREAM_MIN_TOKENS = int(os.environ.get("QUAD_HADAMARD_STREAM_MIN", "512"))
# Narrower rows keep several one-block rows a SM in flight already (and are unmeasured gated).
STREAM_ROW_MIN = 8192
# Streamed gated rows whose dense factor the tensor cores can take (kernels_tl.hadamard_quant_mma:
# 24 to 32 points times 512, Llama-3-8B's 14336) run it as mma.sync products instead of float32
# sums. QUAD_HADAMARD_MMA=0: the scalar streaming kernel.
MMA = os.environ.get("QUAD_HADAMARD_MMA", "1") == "1"
# Square plain rows (4096 = 64 x 64: the o_proj input of Llama-3-8B-class models; 1024) in two
# register passes (kernels_tl.hadamard_quant_square) from this many tokens. 0, the default: never
# (not yet measured on a GPU; bench/sweeps.py --hadamard-stream times it beside the one-block kernel).
SQUARE_MIN_TOKENS = int(os.environ.get("QUAD_HADAMARD_SQUARE_MIN", "0"))


def _cluster_shape(m: int) -> tuple[int, int]:
    """(blocks per cluster, threads per block) of the cluster variant at m tokens."""
    return (8, 256) if m <= 4 else (4, 512) if m <= 16 else (4, 256)


def kernel_choice(m: int, n: int, factors: tuple, block, gated: bool = False) -> tuple:
    """Which kernel `hadamard_quant_op` runs at m tokens: ("mma",), ("stream",), ("square",),
    ("cluster", blocks, threads), ("few",) or ("default",). Token counts with the same choice share
    one compiled kernel."""
    if (gated and STREAM_MIN_TOKENS and m >= STREAM_MIN_TOKENS and n >= STREAM_ROW_MIN
            and stream_fits(n, tuple(factors), block, gated)):
        # The mma kernel's SwiGLU is the fast one: QUAD_FAST_SILU=0 keeps the scalar kernel.
        return ("mma",) if MMA and FAST_SILU and mma_fits(n, tuple(factors), block, gated) else ("stream",)
    if SQUARE_MIN_TOKENS and m >= SQUARE_MIN_TOKENS and square_fits(n, tuple(factors), block, gated):
        return ("square",)
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
    prefill_kernel = choice in (("default",), ("stream",))
    fast = {"fast_silu": True} if gated and FAST_SILU and prefill_kernel else {}
    if choice[0] == "mma":
        return hadamard_quant_mma(n, factors, bits, clip, stream_blocks(n, factors, block, gated))
    if choice[0] == "square":
        return hadamard_quant_square(n, bits, clip)
    if choice[0] == "stream":
        return hadamard_quant_stream(n, factors, block, bits, clip, stream_blocks(n, factors, block, gated), gated=gated,
                                     **fast)
    if choice[0] == "cluster":
        return hadamard_quant_cluster(n, factors, bits, clip, cluster=choice[1], threads=choice[2], gated=gated, **fast)
    if choice[0] == "few":
        return hadamard_quant(n, factors, block, bits, clip, gated=gated, **FEW_TOKENS_SHAPE, **fast)
    return hadamard_quant(n, factors, block, bits, clip, gated=gated, **fast)


def prebuild_jobs(problems, token_counts) -> list:
    """One build per kernel hadamard_quant_op picks for the (n, factors, block, bits, clip, gated)
    problems at the given token counts: thunks for a thread pool (TileLang compiles through nvcc
    subprocesses, so threads overlap); an engine runs them before capturing its decode steps."""
    jobs = {(kernel_choice(m, n, tuple(factors), block, gated), n, tuple(factors), block, bits, float(clip), bool(gated))
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
    kernel = build_choice(kernel_choice(m, n, factors, block, gated), n, factors, block, bits, float(clip), gated)
    x_q = torch.empty(m, n, dtype=torch.int8, device=x.device)
    x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        kernel(x2, x_q, x_scale)
    return x_q.reshape(*lead, n), x_scale.reshape(*lead, 1)
