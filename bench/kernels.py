"""Kernel benchmark: W4A4 / W4A8 GEMM (+ fused outlier path) and the quantize kernels against torch
baselines timed in the same run on the same GPU: cuBLAS bf16 X·Wᵀ, torch._int_mm int8 and the
unfused reference (kernels_tl.reference on the GPU). CUDA-event timing through
triton.testing.do_bench (median). Prints a table and writes JSON.

    python bench/kernels.py --out bench/results/kernels.json [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from triton.testing import do_bench

from kernels_tl import gemm, gemm_dispatch, gemv
from kernels_tl import reference as ref

MODELS = {
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4160, 4096), "gate_up": (28672, 4096), "down": (4160, 14336)},
    "qwen2.5-7b": {"qkv": (4608, 3584), "o": (3648, 3584), "gate_up": (37888, 3584), "down": (3648, 18944)},
    "smollm2": {"qkv": (960, 576), "o": (640, 576), "gate_up": (3072, 576), "down": (640, 1536)},
}
MS = [1, 4, 16, 64, 256, 1024, 2048, 8192]
RANK = 64


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100)


def bench_graph(fns: list) -> float:
    """ms per call for back-to-back calls replayed from one CUDA graph, as the engine's decode
    step runs its layers: no launch gaps, and each call reads its own weights (enough copies that
    they do not fit in L2, as with a model's many layers)."""
    calls = max(20, len(fns))
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return do_bench(graph.replay, warmup=5, rep=50) / calls


def build_all(thunks: dict) -> dict:
    """Compile many kernel variants in parallel (nvcc subprocesses overlap): key -> kernel or exception."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(thunk):
        try:
            return thunk()
        except Exception as e:  # a variant that does not build is reported, not fatal
            return e

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(thunks, pool.map(attempt, thunks.values())))


def copies_beyond_l2(nbytes: int) -> int:
    return max(1, -(-150_000_000 // nbytes))


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


def operands(m, n, k, rank):
    dev = "cuda"
    xq = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
    wq = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
    xs, ws = torch.rand(m, device=dev) * 0.01, torch.rand(n, device=dev).half() * 0.01
    xo = torch.randn(m, rank, device=dev).half() if rank else None
    wo = torch.randn(n, rank, device=dev).half() if rank else None
    return xq, xs, wq, ws, xo, wo


def bench_gemm(m: int, n: int, k: int, rank: int, with_reference: bool) -> dict:
    xq, xs, wq, ws, xo, wo = operands(m, n, k, rank)
    wp = ref.pack_int4(wq)
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    t_ours = bench(lambda: gemm_dispatch.w4ax_linear(xq, xs, wp, ws, xo, wo, out=y))
    xb, wb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    t_bf16 = bench(lambda: xb @ wb.T)
    row = {"m": m, "n": n, "k": k, "rank": rank, "ms": t_ours, "bf16_ms": t_bf16}
    if m <= 64:  # decode sizes also as the engine runs them: replayed from a CUDA graph
        yb = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        wps = [wp.clone() for _ in range(copies_beyond_l2(wp.numel()))]
        wbs = [wb.clone() for _ in range(copies_beyond_l2(wb.numel() * 2))]
        row["graph_ms"] = bench_graph([lambda w=w: gemm_dispatch.w4ax_linear(xq, xs, w, ws, xo, wo, out=y) for w in wps])
        row["graph_bf16_ms"] = bench_graph([lambda w=w: torch.matmul(xb, w.T, out=yb) for w in wbs])
        del wps, wbs
    if m > 16:  # torch._int_mm needs M > 16
        w8t = wq.T  # [K, N] column-major: the layout _int_mm is fast on
        row["int_mm_ms"] = bench(lambda: torch._int_mm(xq, w8t))
    if with_reference:
        wf, xf = wq.float(), xq.float()
        row["reference_ms"] = bench(lambda: ref.quant_linear(xf, xs[:, None], wf, ws[:, None], xo, wo))
    must_read = n * k // 2 + n * 2 + m * k + m * 4 + (n + m) * rank * 2
    row.update(tops=2 * m * n * k / t_ours / 1e9, gbps=(must_read + m * n * 2) / t_ours / 1e6,
               speedup_vs_bf16=t_bf16 / t_ours)
    if "graph_ms" in row:
        row.update(graph_gbps=(must_read + m * n * 2) / row["graph_ms"] / 1e6,
                   graph_speedup_vs_bf16=row["graph_bf16_ms"] / row["graph_ms"])
    return row


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


def sweep_decode(n: int, k: int, m: int) -> list[dict]:
    """Split-K variants of the decode kernel at one shape and token count (integer part alone: the
    int32 workspace is not zeroed between calls, its sums only wrap): K splits 1-8, K tiles 256-1024,
    pipeline depth 2-4, timed back to back in a CUDA graph over weight copies larger than L2 (as a
    decode step runs), with the dispatch's own plan marked. GB/s on the packed weight; each
    variant's int32 sums checked against the first variant's."""
    from kernels_tl.gemm_dispatch import decode_plan

    xq, xs, wq, ws, _, _ = operands(m, n, k, 0)
    wps = [ref.pack_int4(wq)] + [ref.pack_int4(wq).clone() for _ in range(copies_beyond_l2(n * k // 2) - 1)]
    acc = torch.zeros(m, n, device="cuda", dtype=torch.int32)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    variants = [(s, bk, st) for s in (1, 2, 4, 8) for bk, st in ((256, 4), (512, 2), (512, 3), (512, 4), (1024, 2))
                if k % (bk * s) == 0 and k // (bk * s) >= 2]
    plan = decode_plan(m, n, k)
    builders = {v: (lambda v=v: gemm.w4ax_gemm_splitk(n, k, v[0], block_m, 64, v[1], v[2])) for v in variants}
    built = build_all(builders)
    # The integer sums of one call on a zeroed workspace, the first variant's as the reference.
    want = None
    rows = []
    for variant in variants:
        split, bk, stages = variant
        row = {"n": n, "k": k, "m": m, "split": split, "block_k": bk, "stages": stages,
               "dispatch": variant == (plan["split"], plan["block_k"], plan["num_stages"])}
        kern = built[variant]
        try:
            if isinstance(kern, Exception):
                raise kern
            acc.zero_()
            kern(xq, wps[0], acc)
            if want is None:
                want = acc.clone()
            row["exact"] = bool(torch.equal(acc, want))
            t = bench_graph([lambda w=w: kern(xq, w, acc) for w in wps])
            row.update(ms=t, gbps=n * k / 2 / t / 1e6)
        except Exception as e:  # reported, not fatal
            row["error"] = str(e).splitlines()[0][:200]
        rows.append(row)
        print(f"  sweep decode {row}", flush=True)
    return rows


def sweep_gemv(n: int, k: int) -> list[dict]:
    rows = []
    variants = [(t, r, w, u) for t in (1, 4, 8) for r, w, u in ((4, 4, 2), (2, 4, 4), (2, 8, 2), (8, 4, 1))]
    kernels = build_all({v: (lambda v=v: gemv.w4ax_gemv(n, k, 64, False, "float16", *v)) for v in variants})
    for tokens in (1, 4, 8):
        xq, xs, wq, ws, xo, wo = operands(tokens, n, k, 64)
        wp, y = ref.pack_int4(wq), torch.empty(tokens, n, device="cuda", dtype=torch.float16)
        bias = torch.zeros(n, device="cuda").half()
        for rows_per_warp, warps, unroll in ((4, 4, 2), (2, 4, 4), (2, 8, 2), (8, 4, 1)):
            kern = kernels[(tokens, rows_per_warp, warps, unroll)]
            if isinstance(kern, Exception):
                continue
            t = bench(lambda: kern(xq, xs, wp, ws, xo, wo, bias, y))
            rows.append({"tokens": tokens, "rows_per_warp": rows_per_warp, "warps": warps, "unroll": unroll, "ms": t,
                         "gbps": (n * k / 2 + n * 64 * 2) / t / 1e6})
            print(f"  sweep gemv N={n} K={k} {rows[-1]}", flush=True)
    return rows


HADAMARD_TUNINGS = [dict()] + [dict(threads=t, cols_per_thread=c, max_radix=r) for t in (128, 256, 512, 1024)
                                for c in (1, 2, 4, 8) for r in (3, 4)]
# The cluster variant (kernels_tl.hadamard_quant_cluster), timed at the small token counts it is for.
CLUSTER_TUNINGS = [dict(cluster=c, threads=t) for c in (4, 8) for t in (128, 256, 512)]
CLUSTER_MAX_M = 64


def sweep_hadamard(n: int, gated: bool, ms=(1, 4, 16, 32, 64, 2048)) -> list[dict]:
    """Launch shapes of the Hadamard+quantize kernel at one width, per token count M: the decode
    step runs it at M = 1 as a single thread block (10 µs a call for the down_proj input on an
    H200), so its best shape at small M is not that at M = 2048. Each variant's codes are compared
    with the default's (same inputs), and timed back to back in a CUDA graph for M <= 64 (as the
    decode step runs), with do_bench above. Up to CLUSTER_MAX_M tokens the cluster variant
    (the row split over a thread-block cluster) is timed too."""
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_cluster import hadamard_quant_cluster

    factors = tuple(hadamard_factors(n))
    keys = [tuple(sorted(t.items())) for t in HADAMARD_TUNINGS]
    thunks = {key: (lambda t=t: hadamard_quant(n, factors, None, 8, 0.9, gated=gated, **t))
              for key, t in zip(keys, HADAMARD_TUNINGS)}
    cluster_keys = [(("kernel", "cluster"),) + tuple(sorted(t.items())) for t in CLUSTER_TUNINGS]
    thunks.update({key: (lambda t=t: hadamard_quant_cluster(n, factors, 8, 0.9, gated=gated, **t))
                   for key, t in zip(cluster_keys, CLUSTER_TUNINGS)})
    built = build_all(thunks)
    rows = []
    for m in ms:
        x = torch.randn(m, 2 * n if gated else n, device="cuda").half()
        want_q, want_s = torch.empty(m, n, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
        built[keys[0]](x, want_q, want_s)
        moved = x.numel() * 2 + m * n + m * 4
        for key in keys + (cluster_keys if m <= CLUSTER_MAX_M else []):
            kern, row = built[key], {"n": n, "gated": gated, "m": m, "tuning": dict(key)}
            if isinstance(kern, Exception):
                rows.append({**row, "error": str(kern).splitlines()[0][:200]})
                continue
            q, sc = torch.full_like(want_q, 0x55), torch.full_like(want_s, float("nan"))
            try:
                kern(x, q, sc)
                t = bench_graph([lambda: kern(x, q, sc)]) if m <= 64 else bench(lambda: kern(x, q, sc))
            except Exception as e:  # a variant that does not launch is reported, not fatal
                rows.append({**row, "error": str(e).splitlines()[0][:200]})
                continue
            row.update(us=1e3 * t, gbps=moved / t / 1e6, codes_equal=(q == want_q).float().mean().item(),
                       scale_max_rel=((sc - want_s).abs() / want_s.abs()).max().item())
            rows.append(row)
        best = min((r for r in rows if r["m"] == m and "us" in r), key=lambda r: r["us"], default=None)
        default = next((r for r in rows if r["m"] == m and r["tuning"] == {} and "us" in r), None)
        if best and default:
            print(f"  sweep hadamard n={n} gated={gated} M={m}: default {default['us']:.1f} us, best {best['us']:.1f} us "
                  f"{best['tuning']} (codes equal {best['codes_equal']:.4f})", flush=True)
    return rows


QUANT_SHAPES = {"llama-3-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944), "smollm2": (576, 1536)}


def bench_quantize(model: str, m: int) -> list[dict]:
    """Norm+quantize (d + r wide residual) and Hadamard+quantize (the down_proj input), GB/s on the
    bytes they must move, and each followed by its GEMM against cuBLAS bf16 on the same shape."""
    from kernels_tl import quantize as qk
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import hadamard_quant

    d, f = QUANT_SHAPES[model]
    rows = []
    h = torch.randn(m, RANK + d, device="cuda").half()
    x_out, x_q = torch.empty(m, RANK, device="cuda").half(), torch.empty(m, d, device="cuda", dtype=torch.int8)
    x_s = torch.empty(m, device="cuda")
    norm = qk.rmsnorm_quant(RANK + d, RANK, d, 4, 0.9, 1e-5)
    t = bench(lambda: norm(h, x_out, x_q, x_s))
    moved = h.numel() * 2 + x_out.numel() * 2 + x_q.numel() + m * 4
    n_gu = 2 * f
    wq = ref.pack_int4(torch.randint(-8, 8, (n_gu, d), device="cuda", dtype=torch.int8))
    ws, wo = torch.rand(n_gu, device="cuda").half(), torch.randn(n_gu, RANK, device="cuda").half()
    y = torch.empty(m, n_gu, device="cuda").half()
    t_fused = bench(lambda: (norm(h, x_out, x_q, x_s), gemm_dispatch.w4ax_linear(x_q, x_s, wq, ws, x_out, wo, out=y)))
    xb, wb = torch.randn(m, d, device="cuda").bfloat16(), torch.randn(n_gu, d, device="cuda").bfloat16()
    t_bf16 = bench(lambda: xb @ wb.T)
    rows.append({"model": model, "kernel": "rmsnorm_quant", "m": m, "width": RANK + d, "ms": t, "gbps": moved / t / 1e6,
                 "with_gemm": {"n": n_gu, "k": d, "ms": t_fused, "bf16_ms": t_bf16, "speedup_vs_bf16": t_bf16 / t_fused}})
    factors = hadamard_factors(f)
    x = torch.randn(m, f, device="cuda").half()
    a_q, a_s = torch.empty(m, f, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
    had = hadamard_quant(f, tuple(factors), None, 4, 0.9)
    t = bench(lambda: had(x, a_q, a_s))
    moved = x.numel() * 2 + a_q.numel() + m * 4
    wq = ref.pack_int4(torch.randint(-8, 8, (d, f), device="cuda", dtype=torch.int8))
    ws, y = torch.rand(d, device="cuda").half(), torch.empty(m, d, device="cuda").half()
    t_fused = bench(lambda: (had(x, a_q, a_s), gemm_dispatch.w4ax_linear(a_q, a_s, wq, ws, out=y)))
    xb, wb = torch.randn(m, f, device="cuda").bfloat16(), torch.randn(d, f, device="cuda").bfloat16()
    t_bf16 = bench(lambda: xb @ wb.T)
    rows.append({"model": model, "kernel": "hadamard_quant", "m": m, "n": f, "factors": factors, "ms": t,
                 "gbps": moved / t / 1e6,
                 "with_gemm": {"n": d, "k": f, "ms": t_fused, "bf16_ms": t_bf16, "speedup_vs_bf16": t_bf16 / t_fused}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only")
    ap.add_argument("--sweep", action="store_true", help="also time tile / split variants at Llama-3-8B shapes")
    ap.add_argument("--sweep-hadamard", action="store_true",
                    help="only the Hadamard+quantize launch-shape sweep (Llama-3-8B o_proj and gated down_proj inputs)")
    ap.add_argument("--sweep-decode", action="store_true",
                    help="only the split-K decode GEMM sweep (Llama-3-8B linears at 16 and 32 tokens)")
    args = ap.parse_args()
    copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * copy.numel() / bench(lambda: copy.clone()) / 1e6
    print(f"device copy: {copy_gbps:.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tilelang": __import__("tilelang").__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "gemm": []}
    def save():  # after every section: a run cut short by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.sweep or args.sweep_hadamard:
        result["sweep_hadamard"] = []
        for n, gated, ms in ((4096, False, None), (14336, True, None), (14336, False, (1, 16, 2048))):
            result["sweep_hadamard"] += sweep_hadamard(n, gated, **({"ms": ms} if ms else {}))
            save()
    if args.sweep_hadamard:
        return
    if args.sweep_decode:
        result["sweep_decode"] = []
        for m in (32, 16):
            for n, k in MODELS["llama-3-8b"].values():
                result["sweep_decode"] += sweep_decode(n, k, m)
                save()
        return
    if args.sweep:
        result["sweep_gemv"] = {f"{n}x{k}": sweep_gemv(n, k) for n, k in MODELS["llama-3-8b"].values()}
        result["sweep_prefill"] = {f"{n}x{k}": sweep_prefill(n, k, 4096) for n, k in MODELS["llama-3-8b"].values()}
        result["sweep_decode"] = [row for n, k in MODELS["llama-3-8b"].values() for m in (16, 32)
                                  for row in sweep_decode(n, k, m)]
    models = ["llama-3-8b"] if args.quick else list(MODELS)
    result["quantize"] = []
    for model in models:
        for m in (2048, 8192):
            for row in bench_quantize(model, m):
                result["quantize"].append(row)
                g = row["with_gemm"]
                print(f"{model:11s} {row['kernel']:15s} M={m:5d}: {row['ms'] * 1e3:8.1f} us {row['gbps']:6.0f} GB/s "
                      f"({row['gbps'] / copy_gbps:4.0%} of copy); + GEMM {g['n']}x{g['k']}: {g['ms'] * 1e3:8.1f} us, "
                      f"bf16 {g['bf16_ms'] * 1e3:8.1f} us x{g['speedup_vs_bf16']:.2f}", flush=True)
    save()
    gemm_dispatch.prebuild([(m, n, k, RANK if name in ("qkv", "gate_up") else 0, False, "float16")
                            for model in models for name, (n, k) in MODELS[model].items() for m in MS])
    for model in models:
        for name, (n, k) in MODELS[model].items():
            rank = RANK if name in ("qkv", "gate_up") else 0
            for m in MS:
                row = {"model": model, "linear": name,
                       **bench_gemm(m, n, k, rank, with_reference=m in (1, 2048) and model == "llama-3-8b")}
                result["gemm"].append(row)
                print(f"{model:11s} {name:8s} M={m:5d} N={n:5d} K={k:5d} r={rank:3d}: {row['ms'] * 1e3:8.1f} us "
                      f"{row['tops']:7.1f} TOPS {row['gbps']:7.0f} GB/s ({row['gbps'] / copy_gbps:4.0%} of copy)  "
                      f"bf16 {row['bf16_ms'] * 1e3:8.1f} us  x{row['speedup_vs_bf16']:.2f}" + (
                          f" | graph {row['graph_ms'] * 1e3:6.1f} us {row['graph_gbps'] / copy_gbps:4.0%} of copy,"
                          f" bf16 {row['graph_bf16_ms'] * 1e3:6.1f} us x{row['graph_speedup_vs_bf16']:.2f}"
                          if "graph_ms" in row else ""), flush=True)
        save()


if __name__ == "__main__":
    main()
