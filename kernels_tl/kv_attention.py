"""Paged int4 KV cache kernels (TileLang, Hopper): split-KV decode attention (the store: `kv_store.py`).

Layout (per layer; `reference.py` and docs/kv-cache-format.md define it): data uint8
[num_blocks, kv_heads, block_size, head_dim / 2], two elements per byte (low nibble first), and
meta float16 [num_blocks, kv_heads, block_size, 2] = (scale, zero) of each (token, head). One
(block, head) tile is contiguous, so the attention kernel streams 64-token tiles of one head.

Decode attention is flash-decoding: one program per (sequence, kv head, split of the context)
(`decode_main`, `split_blocks`); the program's query rows are the GQA group of that kv head, so K
and V are read once per group; softmax is online in float32. A combine kernel merges the splits
with their log-sum-exp. Two kernels fill that frame: `kv_attention_rf.attention_decode_rf` (the
default: K / V from registers into mma.sync, each warp its own tokens) and this module's
`attention_decode` (each K / V tile dequantized in shared memory to float16, the group padded to
the 16-row mma tile); `decode_kernel` picks. Batch, number of blocks and block-table width are
dynamic (no recompile per step).
(Merging the splits in the last program of each group instead, after an atomic count, measured
slower than the second kernel: docs/results.md, 2026-12-01.)
"""

import functools
import math
import os

import tilelang
import tilelang.language as T

from kernels_tl.attention_tiles import attention_buffers, load_kv_block, prefetch_macros, softmax_pv
from kernels_tl.pdl import wait_for_producers

from kernels_tl.targets import SM90, TARGETS  # noqa: F401
BLOCK_SIZE = 64  # tokens per cache block = the decode kernel's K / V tile
# attention_decode's loop. The register-prefetch loop (next block's packed K / V in registers while
# the current one is multiplied) takes 160 registers a thread uncapped (ptxas -v, Llama-3-8B shapes):
# 3 programs of 128 threads a SM, which loses to the plain loop (96 registers, 48.6 KB of shared
# memory: 4 a SM) on dense grids. Capped by __launch_bounds__(128, min_blocks) it builds without
# spills at 4 (126 registers) and 5 blocks a SM (96 registers, 39 KB of shared memory: its packed
# tiles stay in registers), and then wins everywhere (bench/results/attention_h200_2026-11-30c.json,
# Llama-3-8B shapes, all variants in one run, vs plain): the 4-cap on grids of up to 3 programs a SM
# (batch 1: 1.26-1.35x, one noisy row aside; batch 16 x 3 splits, 384 programs: 1.25-1.27x), the
# 5-cap above (batch 64, 512 programs: 1.25-1.31x, 2-4% ahead of the 4-cap).
# QUAD_DECODE_PREFETCH=1 / 0 forces the loop, QUAD_DECODE_MIN_BLOCKS the cap.
MIN_BLOCKS_SPARSE, MIN_BLOCKS_DENSE = 4, 5
DENSE_PROGRAMS_PER_SM = 3
DECODE_PREFETCH = {"1": True, "0": False}.get(os.environ.get("QUAD_DECODE_PREFETCH", ""))
DECODE_MIN_BLOCKS = int(os.environ["QUAD_DECODE_MIN_BLOCKS"]) if os.environ.get("QUAD_DECODE_MIN_BLOCKS") else None
# Fewest cache blocks a decode split covers (QUAD_DECODE_SPLIT_BLOCKS overrides). One: at batch 1
# and a short context a program's chain of dependent block loads is what a layer waits for, and
# more, shorter splits shorten it (engine A/B, Llama-3-8B shapes, H200, 2026-12-01: b1 x 1024
# 2.059 / 2.053 ms a step with two blocks, 2.000 / 1.927 with one; b32 unchanged, 5.21-5.23).
DECODE_SPLIT_BLOCKS = int(os.environ.get("QUAD_DECODE_SPLIT_BLOCKS", "1"))
# Programs per SM the split count aims for (QUAD_DECODE_FILL overrides, for A/B runs).
DECODE_FILL = int(os.environ.get("QUAD_DECODE_FILL", "2"))
# Which decode kernel attention_decode_op runs (QUAD_DECODE_ATTENTION): "rf",
# kv_attention_rf.attention_decode_rf (each warp its own 16 tokens a block, K / V fragments in
# registers, no barrier in the loop; 1.1-2.1x the tile kernel at batch >= 16 on an H200), or
# "tile", this module's attention_decode (K / V dequantized to float16 tiles in shared memory, four
# warps on one mma tile). GQA groups over 16 and head_dim not a multiple of 64 run "tile".
DECODE_ATTENTION = os.environ.get("QUAD_DECODE_ATTENTION", "rf")
assert DECODE_ATTENTION in ("tile", "rf"), DECODE_ATTENTION
# The "rf" kernel's pipeline (QUAD_DECODE_RF_STAGES overrides; default by grid, decode_rf_stages):
# 1, the next block in registers; 2-5, a cp.async ring of that many blocks in shared memory. A ring
# of 3 won on grids of up to 3 programs a SM (batch 1 x 32k 26.5 against 32.3 µs, 16 x 4k 40.7
# against 44.7) and lost on denser ones (64 x 32k, 512 programs: 933.0 against 868.3), where 4
# resident programs a SM already keep enough in flight (bench/results/attention_rf_h200_2026-12-02b.json).
DECODE_RF_STAGES = int(os.environ["QUAD_DECODE_RF_STAGES"]) if os.environ.get("QUAD_DECODE_RF_STAGES") else None

# The "rf" kernel's rescale slack (QUAD_DECODE_RF_SLACK, log2 units; 0: rescale at every block),
# see kv_attention_rf.attention_decode_rf. 8 beside 0, same run: 16 x 16k 123.6 against 128.5 µs,
# 16 x 32k 234.9 / 245.0, 64 x 32k 862.5 / 873.0, a tie at batch 1 (error against the every-block
# kernel 1-2e-4; bench/results/attention_rf_h200_2026-12-02c.json).
DECODE_RF_SLACK = float(os.environ.get("QUAD_DECODE_RF_SLACK", "8"))


def decode_rf_stages(batch: int, kv_heads: int, num_splits: int, sms: int = 132) -> int:
    """The "rf" kernel's pipeline depth for this grid (DECODE_RF_STAGES where set)."""
    if DECODE_RF_STAGES is not None:
        return DECODE_RF_STAGES
    return 1 if batch * kv_heads * num_splits > DENSE_PROGRAMS_PER_SM * sms else 3


def decode_kernel(heads: int, kv_heads: int, head_dim: int) -> str:
    """The decode kernel attention_decode_op runs for these heads: DECODE_ATTENTION where it applies."""
    fits_rf = heads // kv_heads <= 16 and head_dim % 64 == 0
    return DECODE_ATTENTION if fits_rf else "tile"


def decode_loop(batch: int, kv_heads: int, num_splits: int, sms: int = 132) -> tuple[bool, int]:
    """(prefetch, min_blocks): the loop decode attention runs for this grid and its register cap
    (blocks a SM; 1 is none)."""
    prefetch = True if DECODE_PREFETCH is None else DECODE_PREFETCH
    return prefetch, prefetch_min_blocks(batch, kv_heads, num_splits, sms) if prefetch else 1


def prefetch_min_blocks(batch: int, kv_heads: int, num_splits: int, sms: int = 132) -> int:
    """The prefetch loop's register cap for this grid."""
    if DECODE_MIN_BLOCKS is not None:
        return DECODE_MIN_BLOCKS
    dense = batch * kv_heads * num_splits > DENSE_PROGRAMS_PER_SM * sms
    return MIN_BLOCKS_DENSE if dense else MIN_BLOCKS_SPARSE


def split_blocks(ctx, split, num_splits: int, block_size: int):
    """(first, count): the cache blocks split `split` of `num_splits` walks in a context of ctx
    tokens (count 0 for an empty split), the partition attention_combine merges."""
    n_blocks = T.ceildiv(ctx, block_size)
    per_split = T.ceildiv(n_blocks, num_splits)
    first = split * per_split
    return first, T.max(T.min(n_blocks - first, per_split), 0)


def decode_main(heads: int, kv_heads: int, head_dim: int, num_splits: int, block_size: int, threads: int, program):
    """The prim_func of a split-KV decode attention kernel (both kernels share its arguments): one
    program(Q, KD, KM, VD, VM, TABLES, LENS, OP, LSE, seq, kvh, split) per (sequence, kv head,
    split), writing the split's normalized partial output and log2-sum-exp."""
    b = T.dynamic("batch")
    nb = T.dynamic("num_blocks")
    width = T.dynamic("table_width")
    half = head_dim // 2

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
            program(Q, KD, KM, VD, VM, TABLES, LENS, OP, LSE, seq, kvh, split)

    return main


@functools.lru_cache(maxsize=None)
def attention_decode(heads: int, kv_heads: int, head_dim: int, num_splits: int, block_size: int = BLOCK_SIZE,
                     sm_scale: float | None = None, threads: int = 128, target=None, num_stages: int = 1,
                     prefetch: bool = False, min_blocks: int = 1):
    """Split-KV decode attention over the paged int4 cache: kernel(q, k_data, k_meta, v_data,
    v_meta, block_tables, context_lens, out_partial, lse) writes, for every split, the normalized
    partial output [B, heads, splits, head_dim] and its log2-sum-exp [B, heads, splits]
    (-inf for an empty split); `attention_combine` merges them.

    num_stages > 1 (not yet run on a GPU): the split's cache blocks stream through TileLang's
    software pipeline (copy engine + warp specialization: the next blocks' packed K / V in flight
    while one is dequantized and multiplied; scale and zero from global memory, see
    load_kv_block). The default loop has one block (8.5 KB) in flight per program at a time.

    prefetch (one stage only): each thread loads its share of the next block's packed K / V and
    their scale / zero into registers while the current block is multiplied, and dequantizes from
    registers straight into the float16 tiles (quad_kv_dequant8: a few integer ops and three half2
    ops per two values, against a shift, a convert and float32 math per value through shared
    memory). Same result as the default loop up to float16 rounding order (none for integer zeros).

    min_blocks: blocks per SM the register allocation must allow (__launch_bounds__), see
    decode_loop."""
    group = heads // kv_heads
    rows = 16 * -(-group // 16)  # mma tile height
    scale_log2 = (sm_scale if sm_scale is not None else head_dim ** -0.5) * math.log2(math.e)
    # prefetch: threads // block_size threads share a cache row, each owning `per_thread` packed bytes.
    per_thread, prefetch_loop = prefetch_macros(threads, block_size, head_dim)
    assert not prefetch or (num_stages == 1 and threads % block_size == 0 and per_thread % 4 == 0)

    @tilelang.jit(target=TARGETS[target])
    def build():
        @T.macro
        def scores_and_update(it, first, ctx, q_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk):
            """Block `it` of the split once K / V are in k_s / v_s: masked, log2-scaled scores, then
            the online-softmax step and P·V."""
            T.clear(s)
            T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
            for i, j in T.Parallel(rows, block_size):
                s[i, j] = T.if_then_else((first + it) * block_size + j < ctx, s[i, j] * T.float32(scale_log2),
                                         -T.infinity("float32"))
            softmax_pv(s, m, m_prev, rescale, l, l_blk, o, p_s, v_s, rows, block_size, head_dim)

        @T.macro
        def one_block(it, seq, kvh, first, ctx, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s,
                      p_s, o, m, m_prev, rescale, l, l_blk):
            """One cache block of the split: dequantize K / V, online softmax, P·V."""
            phys = TABLES[seq, first + it]
            load_kv_block(KD, KM, VD, VM, phys, kvh, kp_s, km_s, vp_s, vm_s, k_s, v_s, block_size, head_dim,
                           num_stages)
            scores_and_update(it, first, ctx, q_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk)

        @T.macro
        def program(Q, KD, KM, VD, VM, TABLES, LENS, OP, LSE, seq, kvh, split):
            """One (sequence, kv head, split) program: its partial output and log2-sum-exp."""
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            (q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l,
             l_blk) = attention_buffers(rows, block_size, head_dim)
            wait_for_producers("attention")

            ctx = LENS[seq]
            first, count = split_blocks(ctx, split, num_splits, block_size)

            for i, d in T.Parallel(rows, head_dim):
                q_s[i, d] = T.if_then_else(i < group, Q[seq, kvh * group + i, d], T.float16(0))
            T.fill(o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity("float32"))
            if prefetch:
                prefetch_loop(count, lambda it: TABLES[seq, first + it], kvh, KD, KM, VD, VM, k_s, v_s,
                              lambda it: scores_and_update(it, first, ctx, q_s, k_s, v_s, s, p_s, o, m, m_prev,
                                                           rescale, l, l_blk))
            elif num_stages == 1:
                for it in T.serial(count):
                    one_block(it, seq, kvh, first, ctx, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s,
                              s, p_s, o, m, m_prev, rescale, l, l_blk)
            else:
                for it in T.Pipelined(count, num_stages=num_stages):
                    one_block(it, seq, kvh, first, ctx, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s,
                              s, p_s, o, m, m_prev, rescale, l, l_blk)
            for i, d in T.Parallel(rows, head_dim):
                if i < group:
                    OP[seq, kvh * group + i, split, d] = T.if_then_else(l[i] > 0, o[i, d] / l[i], T.float32(0))
            for i in T.Parallel(rows):
                if i < group:
                    LSE[seq, kvh * group + i, split] = T.if_then_else(
                        l[i] > 0, T.log2(l[i]) + m[i], -T.infinity("float32"))

        return decode_main(heads, kv_heads, head_dim, num_splits, block_size, threads, program)

    return build()


@functools.lru_cache(maxsize=None)
def attention_combine(heads: int, head_dim: int, num_splits: int, target=None):
    """out[b, h] = Σ_s 2^(lse_s - lse) · partial_s with lse = log2 Σ_s 2^lse_s; float16 out."""

    @tilelang.jit(target=TARGETS[target])
    def build():
        b = T.dynamic("batch")

        @T.prim_func
        def main(OP: T.Tensor((b, heads, num_splits, head_dim), "float32"),
                 LSE: T.Tensor((b, heads, num_splits), "float32"), OUT: T.Tensor((b, heads, head_dim), "float16")):
            with T.Kernel(b, heads, threads=head_dim) as (seq, h):
                wait_for_producers("attention")
                d = T.get_thread_binding()
                top = T.alloc_local((1,), "float32")
                total = T.alloc_local((1,), "float32")
                acc = T.alloc_local((1,), "float32")
                top[0] = -T.infinity("float32")
                for sp in T.serial(num_splits):
                    top[0] = T.max(top[0], LSE[seq, h, sp])
                total[0] = 0
                acc[0] = 0
                for sp in T.serial(num_splits):
                    w = T.if_then_else(LSE[seq, h, sp] == -T.infinity("float32"), T.float32(0),
                                       T.exp2(LSE[seq, h, sp] - top[0]))
                    total[0] = total[0] + w
                    acc[0] = acc[0] + w * OP[seq, h, sp, d]
                OUT[seq, h, d] = T.Cast("float16", acc[0] / total[0])

        return main

    return build()


def decode_splits(batch: int, kv_heads: int, max_context: int, block_size: int = BLOCK_SIZE, sms: int = 132,
                  min_blocks: int | None = None) -> int:
    """Context splits so that batch x kv_heads x splits programs fill the GPU about DECODE_FILL
    times, with at least min_blocks cache blocks per split (default DECODE_SPLIT_BLOCKS)."""
    want = -(-DECODE_FILL * sms // (batch * kv_heads))
    per_split = (min_blocks or DECODE_SPLIT_BLOCKS) * block_size
    return max(1, min(want, max_context // per_split, 32))


def prebuild_decode(heads: int, kv_heads: int, head_dim: int, grids: list[tuple[int, int]],
                    block_size: int = BLOCK_SIZE, workers: int = 16) -> None:
    """Compile, for every (batch, splits) decode grid, the attention loop decode_loop picks there
    and the combine kernel, in parallel (TileLang compiles through nvcc subprocesses, so threads
    overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    # The arguments exactly as attention_decode_op passes them: lru_cache keys on the call's form.
    splits = sorted({n for _, n in grids})
    if decode_kernel(heads, kv_heads, head_dim) == "rf":
        from kernels_tl.kv_attention_rf import attention_decode_rf
        variants = sorted({(n, decode_rf_stages(batch, kv_heads, n)) for batch, n in grids})
        jobs = [functools.partial(attention_decode_rf, heads, kv_heads, head_dim, n, block_size, None, None, 1,
                                  stages, DECODE_RF_SLACK) for n, stages in variants]
    else:
        variants = sorted({(n, *decode_loop(batch, kv_heads, n)) for batch, n in grids})
        jobs = [functools.partial(attention_decode, heads, kv_heads, head_dim, n, block_size, None, 128, None, 1,
                                  prefetch, min_blocks) for n, prefetch, min_blocks in variants]
    jobs += [functools.partial(attention_combine, heads, head_dim, n) for n in splits]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: job(), jobs))


def attention_decode_op(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, num_splits: int,
                        sm_scale: float | None = None, out=None, num_stages: int = 1, prefetch: bool | None = None,
                        min_blocks: int | None = None, kernel: str | None = None, rf_stages: int | None = None,
                        rf_slack: float | None = None):
    """float16 [B, heads, head_dim] decode attention (q [B, heads, head_dim] float16). kernel: "tile"
    or "rf" (default decode_kernel's choice). For "rf": rf_stages and rf_slack, its pipeline depth
    and rescale slack (default decode_rf_stages's choice, DECODE_RF_SLACK). For "tile":
    prefetch, attention_decode's register-prefetch loop (default: decode_loop's choice; one stage
    only); min_blocks, its register cap (default decode_loop's for the prefetch loop, none for the
    others)."""
    import torch

    b, heads, head_dim = q.shape
    kv_heads = k_data.shape[1]
    partial = torch.empty(b, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, heads, head_dim, dtype=torch.float16, device=q.device) if out is None else out
    if (kernel or decode_kernel(heads, kv_heads, head_dim)) == "rf":
        from kernels_tl.kv_attention_rf import attention_decode_rf
        attention_decode_rf(heads, kv_heads, head_dim, num_splits, k_data.shape[2], sm_scale, None, 1,
                            rf_stages or decode_rf_stages(b, kv_heads, num_splits),
                            DECODE_RF_SLACK if rf_slack is None else rf_slack)(
            q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, partial, lse)
        attention_combine(heads, head_dim, num_splits)(partial, lse, out)
        return out
    prefetch = (decode_loop(b, kv_heads, num_splits)[0] if prefetch is None else prefetch) and num_stages == 1
    if min_blocks is None:
        min_blocks = prefetch_min_blocks(b, kv_heads, num_splits) if prefetch else 1
    kernel = attention_decode(heads, kv_heads, head_dim, num_splits, k_data.shape[2], sm_scale, 128, None, num_stages,
                              prefetch, min_blocks)
    kernel(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, partial, lse)
    attention_combine(heads, head_dim, num_splits)(partial, lse, out)
    return out
