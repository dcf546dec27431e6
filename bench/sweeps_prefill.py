"""Prefill-side kernel sweeps at Llama-3-8B shapes (bench/sweeps.py runs them): the prefill GEMM's
tiles against a plain int8 TileLang GEMM at the same tiles, the register-unpack GEMM's variants
(outlier tiles loaded before or after its K loop, blocks in panels of token tiles, K stages), and the
fused RoPE + KV store by tokens a warp. Each variant is
checked against the first (or the default) on the same inputs and timed in the same run.
"""

from __future__ import annotations

import torch
from kernels import bench, build_all, operands

from kernels_tl import gemm, gemm_plans
from kernels_tl import reference as ref


def int8_ceiling(n: int, k: int, block_m: int, block_n: int, block_k: int, num_stages: int, threads: int):
    """A plain int8 x int8 TileLang GEMM at the prefill kernel's tiles (no unpack, no epilogue
    scales): the ceiling the W4 kernel is compared against."""
    import tilelang
    import tilelang.language as T

    @tilelang.jit
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(X: T.Tensor((m, k), "int8"), W: T.Tensor((n, k), "int8"), Y: T.Tensor((m, n), "int32")):
            with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(m, block_m), threads=threads) as (bx, by):
                x_s = T.alloc_shared((block_m, block_k), "int8")
                w_s = T.alloc_shared((block_n, block_k), "int8")
                acc = T.alloc_fragment((block_m, block_n), "int32")
                T.clear(acc)
                for kt in T.Pipelined(k // block_k, num_stages=num_stages):
                    T.copy(X[by * block_m, kt * block_k], x_s)
                    T.copy(W[bx * block_n, kt * block_k], w_s)
                    T.gemm(x_s, w_s, acc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(acc, Y[by * block_m, bx * block_n])

        return main

    return build()


def sweep_prefill(n: int, k: int, m: int) -> list[dict]:
    """Tile variants of the prefill kernel at one shape (integer GEMM alone, rank 0)."""
    xq, xs, wq, ws, _, _ = operands(m, n, k, 0)
    wp, y = ref.pack_int4(wq), torch.empty(m, n, device="cuda", dtype=torch.float16)
    xo, wo, bias = (torch.zeros(m, 16, device="cuda").half(), torch.zeros(n, 16, device="cuda").half(),
                    torch.zeros(n, device="cuda").half())
    rows = []
    x8, w8, y32 = xq, wq, torch.empty(m, n, device="cuda", dtype=torch.int32)
    variants = [v for v in [(256, 128, 128, 4, 256), (384, 128, 128, 3, 384), (256, 128, 128, 4, 512),
                            (256, 128, 128, 5, 256), (256, 64, 128, 4, 256)] if n % v[1] == 0 and k % v[2] == 0]
    thunks = {("ceil", v): (lambda v=v: int8_ceiling(n, k, *v)) for v in variants}
    thunks.update({("w4", v): (lambda v=v: gemm.w4ax_gemm(n, k, 0, False, "float16", *v)) for v in variants})
    built = build_all(thunks)
    for bm, bn, bk, stages, threads in variants:
        try:
            ceil = built[("ceil", (bm, bn, bk, stages, threads))]
            if isinstance(ceil, Exception):
                raise ceil
            t = bench(lambda: ceil(x8, w8, y32))
            rows.append({"tiles": [bm, bn, bk, stages, threads], "int8_ceiling_ms": t, "tops": 2 * m * n * k / t / 1e9})
        except Exception as e:
            rows.append({"tiles": [bm, bn, bk, stages, threads], "int8_ceiling_error": str(e).splitlines()[0][:200]})
        print(f"  sweep prefill N={n} K={k} M={m} {rows[-1]}", flush=True)
        try:
            kern = built[("w4", (bm, bn, bk, stages, threads))]
            if isinstance(kern, Exception):
                raise kern
            kern(xq, xs, wp, ws, xo, wo, bias, y)
            t = bench(lambda: kern(xq, xs, wp, ws, xo, wo, bias, y))
            rows.append({"tiles": [bm, bn, bk, stages, threads], "ms": t, "tops": 2 * m * n * k / t / 1e9})
        except Exception as e:  # a variant that does not build or launch is reported, not fatal
            rows.append({"tiles": [bm, bn, bk, stages, threads], "error": str(e).splitlines()[0][:200]})
        print(f"  sweep prefill N={n} K={k} M={m} {rows[-1]}", flush=True)
    return rows


def sweep_rs_variants(n: int, k: int, m: int, variants: dict, label: str) -> list[dict]:
    """The register-unpack prefill GEMM (the dispatch's tiles, rank 64) with each variant's
    overrides of them (name -> kwargs of gemm_rs.w4ax_gemm_rs): outputs bit-equal to the first
    variant's and within the fp16 bound of the float32 reference; timed with L2 flushed before each
    call (triton's do_bench), so the weights come from DRAM as they do in a model's forward."""
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    xq, xs, wq, ws, xo, wo = operands(m, n, k, 64)
    wp, bias = ref.pack_int4(wq), torch.zeros(n, device="cuda").half()
    want = ref.quant_linear(xq, xs[:, None], wq, ws[:, None], xo, wo)
    tiles = gemm_plans.rs_tiles(m, n, k)
    kernels = build_all({name: (lambda v=v: w4ax_gemm_rs(n, k, 64, False, "float16", **{**tiles, **v}))
                         for name, v in variants.items()})
    rows, first = [], None
    for name, kern in kernels.items():
        row = {"n": n, "k": k, "m": m, "variant": name, "tiles": {**tiles, **variants[name]}}
        try:
            if isinstance(kern, Exception):
                raise kern
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            kern(xq, xs, wp, ws, xo, wo, bias, y)
            first = y.clone() if first is None else first
            row["equal_to_first"] = bool(torch.equal(y, first))
            row["rel_err"] = float((y.float() - want).norm() / want.norm())
            row["ms"] = bench(lambda: kern(xq, xs, wp, ws, xo, wo, bias, y))
            row["tops"] = 2 * m * n * k / row["ms"] / 1e9
        except Exception as e:  # reported, not fatal
            row["error"] = str(e).splitlines()[0][:200]
        rows.append(row)
        print(f"  sweep {label} {row}", flush=True)
    return rows


def sweep_rs_prefetch(n: int, k: int, m: int) -> list[dict]:
    """The prefill GEMM's outlier tiles loaded by cp.async before the K loop against plain loads
    after it (gemm_rs's prefetch_outliers; the plain form first, the other compared with it)."""
    return sweep_rs_variants(n, k, m, {"plain": {"prefetch_outliers": False},
                                       "prefetch": {"prefetch_outliers": True}}, "rs-prefetch")


def sweep_rs_panel(n: int, k: int, m: int, panels=(0, 2, 4, 8, 16)) -> list[dict]:
    """The prefill GEMM's blocks in panels of token tiles (gemm_rs's panel; 0: launch order)."""
    return sweep_rs_variants(n, k, m, {f"panel{p}": {"panel": p} for p in panels}, "rs-panel")


def sweep_rs_stages(n: int, k: int, m: int) -> list[dict]:
    """The prefill GEMM's K pipeline at the dispatch's tiles (panel and scales included): 3 stages of
    128 against 4 (the default since this sweep), 6 stages of 64, 2 stages of 256 in two 128-column
    fragments, and K tiles of 128 in two 64-column fragments (one unpacked while the other's wgmmas
    run) at 3 and 4 stages. Every variant names its stages, so the rows keep their meaning whatever
    the dispatch's default."""
    return sweep_rs_variants(n, k, m, {"k128_s3": {"num_stages": 3}, "k128_s4": {"num_stages": 4},
                                       "k64_s6": {"block_k": 64, "num_stages": 6},
                                       "k256_s2": {"block_k": 256, "chunk": 128, "num_stages": 2},
                                       "k128_s3_c64": {"num_stages": 3, "chunk": 64},
                                       "k128_s4_c64": {"num_stages": 4, "chunk": 64}}, "rs-stages")


def sweep_rs_epilogue(n: int, k: int, m: int) -> list[dict]:
    """The prefill GEMM's epilogue scales read from global memory (128 scalar loads a thread) or
    staged in shared memory by cp.async under the K loop (gemm_rs's stage_scales), the latter also
    with 4 K stages (the plain form first, the others compared with it)."""
    return sweep_rs_variants(n, k, m, {"plain": {"stage_scales": False, "num_stages": 3},
                                       "scales": {"stage_scales": True, "num_stages": 3},
                                       "scales_s4": {"stage_scales": True, "num_stages": 4}}, "rs-epilogue")


def sweep_rope_store(tokens: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[dict]:
    """The fused RoPE + head Hadamard + int4 KV store (round trip, as a prefill runs it) by tokens a
    warp: every output and the cache equal to one token a warp's, GB/s on the bytes it must move."""
    from kernels_tl.kv_attention import BLOCK_SIZE
    from kernels_tl.rope_kv_store import rope_kv_store
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width, device="cuda") * 2).half()
    angles = torch.rand(tokens, head_dim, device="cuda") * 6.28
    cos, sin = angles.cos(), angles.sin()
    blocks = -(-tokens // BLOCK_SIZE)
    slots = torch.randperm(blocks * BLOCK_SIZE, device="cuda")[:tokens].int()
    moved = tokens * (width * 2 + 2 * head_dim * 4 + 4 + heads * head_dim * 2 + 2 * kv_heads * head_dim * 2
                      + 2 * kv_heads * (head_dim // 2 + 4))
    kernels = build_all({tpw: (lambda tpw=tpw: rope_kv_store(heads, kv_heads, head_dim, round_trip=True,
                                                             tokens_per_warp=tpw)) for tpw in (1, 2, 4, 8)})
    rows, first = [], None
    for tpw, kern in kernels.items():
        row = {"tokens": tokens, "tokens_per_warp": tpw}
        try:
            if isinstance(kern, Exception):
                raise kern
            cache = [torch.zeros(blocks, kv_heads, BLOCK_SIZE, head_dim // 2, dtype=torch.uint8, device="cuda"),
                     torch.zeros(blocks, kv_heads, BLOCK_SIZE, 2, dtype=torch.float16, device="cuda")]
            cache = cache + [c.clone() for c in cache]
            outs = [torch.full((tokens, n, head_dim), float("nan"), dtype=torch.float16, device="cuda")
                    for n in (heads, kv_heads, kv_heads)]
            kern(qkv, cos, sin, slots, *cache, *outs)
            got = [t.clone() for t in outs + cache]
            first = first or got
            row["equal_to_one_token_a_warp"] = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                                                   for a, b in zip(got, first))
            row["ms"] = bench(lambda: kern(qkv, cos, sin, slots, *cache, *outs))
            row["gbps"] = moved / row["ms"] / 1e6
        except Exception as e:  # reported, not fatal
            row["error"] = str(e).splitlines()[0][:200]
        print(f"  sweep rope-store {row}", flush=True)
        rows.append(row)
    return rows
