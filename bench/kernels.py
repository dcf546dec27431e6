"""Kernel benchmark: W4A4 / W4A8 GEMM (+ fused outlier path) and the quantize kernels against torch
baselines timed in the same run on the same GPU: cuBLAS bf16 X·Wᵀ, torch._int_mm int8 and the
unfused reference (kernels_tl.reference on the GPU). CUDA-event timing through
triton.testing.do_bench (median). Prints a table and writes JSON.

    python bench/kernels.py --out bench/results/kernels.json [--quick] [--gemm-ms 2048,8192]

Where the dispatch chooses between GEMM kernels, each row also times those it did not pick
(`alternative_kernels`): above 64 tokens the producer-unpack kernel (kernels_tl.gemm_ws, `ws_ms`),
TileLang's pipelined kernel (`pipelined_ms`) and the register-unpack one (kernels_tl.gemm_rs, `rs_ms`,
with 3 stages `rs_s3_ms`, 128-token tiles `rs_t128_ms`, 256-wide K tiles `rs_k256_ms`); at 5-64 tokens without a K split the other of the
pipelined and producer-unpack decode kernels and the pipelined one with the weights unpacked in
registers (`decode_pipelined_graph_ms` / `decode_ws_graph_ms` / `decode_rs_graph_ms`, replayed from a
CUDA graph as the dispatch's `graph_ms`); each with its largest difference from the dispatch's kernel.

Tile, split and launch-shape sweeps of the same kernels: bench/sweeps.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from triton.testing import do_bench

from kernels_tl import gemm_dispatch, gemm_plans
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


def operands(m, n, k, rank):
    dev = "cuda"
    xq = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
    wq = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
    xs, ws = torch.rand(m, device=dev) * 0.01, torch.rand(n, device=dev).half() * 0.01
    xo = torch.randn(m, rank, device=dev).half() if rank else None
    wo = torch.randn(n, rank, device=dev).half() if rank else None
    return xq, xs, wq, ws, xo, wo


def alternative_kernels(m: int, n: int, k: int, rank: int) -> list:
    """(name, spec) of the GEMMs the dispatch did not pick where it chooses between several
    (float16 out, no bias; spec as gemm_dispatch's, built by gemm_dispatch._build): above 64
    tokens the producer-unpack kernel (`ws`), TileLang's pipelined kernel (`pipelined`) and the
    register-unpack kernel in four tilings (`rs`, `rs_s3`, `rs_t128`: 128-token tiles, `rs_k256`),
    those the dispatch did not pick; at 5-64 tokens without a K split those of the pipelined decode kernel (`decode_pipelined`), the
    producer-unpack one (`decode_ws`), the pipelined one unpacking into registers, two fragments
    or one (`decode_rs`, `decode_rs1`; one block a SM), and the two-fragment one with two blocks a
    SM (`decode_resident2`), the dispatch did not pick. Empty elsewhere."""
    from kernels_tl.gemm import w4ax_gemm
    from kernels_tl.gemm_decode import w4ax_gemm_decode
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    from kernels_tl.gemm_ws import w4ax_gemm_decode_ws, w4ax_gemm_ws
    spec = gemm_dispatch._spec
    picked = gemm_dispatch.kernel_specs(m, n, k, rank, False, "float16")[0]
    if m > 64:
        ws_tiles = gemm_plans.fit_k(gemm_plans.WS_TILES, k)
        rs_tiles = gemm_plans.rs_fit(n, k, gemm_plans.RS_TILES["block_t"])
        kernels = [("ws", spec(w4ax_gemm_ws, n, k, rank, False, "float16", **ws_tiles)),
                   ("pipelined", spec(w4ax_gemm, n, k, rank, False, "float16",
                                      **gemm_plans.prefill_tiles(m, n, k, rank))),
                   ("rs", spec(w4ax_gemm_rs, n, k, rank, False, "float16", **rs_tiles)),
                   ("rs_s3", spec(w4ax_gemm_rs, n, k, rank, False, "float16", **{**rs_tiles, "num_stages": 3})),
                   ("rs_t128", spec(w4ax_gemm_rs, n, k, rank, False, "float16", **{**rs_tiles, "block_t": 128}))]
        if k % 256 == 0:  # 256-wide K tiles as two 128-column fragments: one unpacked beside the other's wgmmas
            kernels.append(("rs_k256", spec(w4ax_gemm_rs, n, k, rank, False, "float16",
                                            **{**rs_tiles, "block_k": 256, "chunk": 128, "num_stages": 2})))
        return [(name, s) for name, s in kernels if s != picked]
    if not 4 < m <= 64:
        return []
    plan = gemm_plans.decode_plan(m, n, k, resident=1)
    if plan["split"] != 1:
        return []
    extra = {"min_blocks": plan["min_blocks"]} if "min_blocks" in plan else {}
    tiles = (plan["block_m"], plan["block_k"], plan["num_stages"])
    kernels = [("decode_pipelined", spec(w4ax_gemm_decode, n, k, rank, False, "float16", *tiles, **extra))]
    if k % 256 == 0 and n % 64 == 0:
        kernels.append(("decode_ws", spec(w4ax_gemm_decode_ws, n, k, rank, False, "float16", plan["block_m"],
                                          **gemm_plans.DECODE_WS_TILES)))
    kernels.append(("decode_rs", spec(w4ax_gemm_decode, n, k, rank, False, "float16", *tiles, **extra,
                                      register_unpack=True, overlap_unpack=True)))
    kernels.append(("decode_rs1", spec(w4ax_gemm_decode, n, k, rank, False, "float16", *tiles, **extra,
                                       register_unpack=True)))
    two = gemm_plans.decode_plan(m, n, k, resident=2)
    if two.get("ws_blocks") == 2 and two["split"] == 1:
        kernels.append(("decode_resident2", spec(w4ax_gemm_decode, n, k, rank, False, "float16", two["block_m"],
                                                 two["block_k"], two["num_stages"], register_unpack=True,
                                                 overlap_unpack=True, ws_blocks=2)))
    return [(name, s) for name, s in kernels if s != picked]


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
    for name, alt in alternative_kernels(m, n, k, rank):  # kernels the dispatch did not pick, beside its choice
        gemm_dispatch.w4ax_linear(xq, xs, wp, ws, xo, wo, out=y)
        bias = torch.zeros(n, device="cuda", dtype=torch.float16)
        y2 = torch.full_like(y, float("nan"))
        try:
            kern = gemm_dispatch._build(alt)
            kern(xq, xs, wp, ws, xo, wo, bias, y2)
            row[f"{name}_max_abs_diff"] = float((y2.float() - y.float()).abs().max())
            if m <= 64:  # replayed from a CUDA graph, as the dispatch's `graph_ms`
                wps = [wp.clone() for _ in range(copies_beyond_l2(wp.numel()))]
                row[f"{name}_graph_ms"] = bench_graph([lambda w=w: kern(xq, xs, w, ws, xo, wo, bias, y2) for w in wps])
                row[f"{name}_graph_gbps"] = (n * k // 2 + n * 2 + m * k + m * 4 + (n + m) * rank * 2 + m * n * 2) \
                    / row[f"{name}_graph_ms"] / 1e6
                del wps
            else:
                row[f"{name}_ms"] = bench(lambda: kern(xq, xs, wp, ws, xo, wo, bias, y2))
                row[f"{name}_tops"] = 2 * m * n * k / row[f"{name}_ms"] / 1e9
        except Exception as e:  # reported, not fatal
            row[f"{name}_error"] = str(e).splitlines()[0][:200]
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


QUANT_SHAPES = {"llama-3-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944), "smollm2": (576, 1536)}


def bench_quantize(model: str, m: int) -> list[dict]:
    """Norm+quantize (d + r wide residual) and Hadamard+quantize (the down_proj input: plain, and
    gated as the engine runs it), GB/s on the bytes they must move, and each followed by its GEMM
    against cuBLAS bf16 on the same shape; then the fused-add norm and the o_proj input's quantizer
    (`_engine_site_quantizers`)."""
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
    # The kernel the engine runs there: the gated one (SwiGLU of gate_up on load, 8-bit codes for
    # W4A4A8's down_proj) in the dispatch's choice at this token count.
    from kernels_tl import hadamard_quant_dispatch as hq
    gate_up = torch.randn(m, 2 * f, device="cuda").half()
    choice = hq.kernel_choice(m, f, tuple(factors), None, True)
    gated = hq.build_choice(choice, f, tuple(factors), None, 8, 0.9, True)
    t = bench(lambda: gated(gate_up, a_q, a_s))
    moved = gate_up.numel() * 2 + a_q.numel() + m * 4
    t_fused = bench(lambda: (gated(gate_up, a_q, a_s), gemm_dispatch.w4ax_linear(a_q, a_s, wq, ws, out=y)))
    rows.append({"model": model, "kernel": "hadamard_gated", "dispatch": list(choice), "m": m, "n": f,
                 "factors": factors, "ms": t, "gbps": moved / t / 1e6,
                 "with_gemm": {"n": d, "k": f, "ms": t_fused, "bf16_ms": t_bf16, "speedup_vs_bf16": t_bf16 / t_fused}})
    rows += _engine_site_quantizers(model, m)
    return rows


def _engine_site_quantizers(model: str, m: int) -> list[dict]:
    """The other two quantizers a prefill layer runs, as the engine calls them: the norm with the
    residual add fused (float32 residual += float16 branch, written back; 4-bit codes, the qkv /
    gate_up site of W4A4A8) and the o_proj input's Hadamard over the whole attention width (8-bit
    codes), the latter followed by the o_proj GEMM against cuBLAS bf16 on the same shape."""
    from kernels_tl import hadamard_quant_dispatch as hq
    from kernels_tl import quantize as qk
    from kernels_tl.hadamard import hadamard_factors

    d = QUANT_SHAPES[model][0]
    width = RANK + d
    h, delta = torch.randn(m, width, device="cuda"), torch.randn(m, width, device="cuda").half()
    x_out, x_q = torch.empty(m, RANK, device="cuda").half(), torch.empty(m, d, device="cuda", dtype=torch.int8)
    x_s = torch.empty(m, device="cuda")
    norm = qk.rmsnorm_quant(width, RANK, d, 4, 0.9, 1e-5, residual="add")
    t = bench(lambda: norm(h, delta, x_out, x_q, x_s))
    moved = h.numel() * (4 + 2 + 4) + x_out.numel() * 2 + x_q.numel() + m * 4
    rows = [{"model": model, "kernel": "rmsnorm_quant_add", "m": m, "width": width, "ms": t, "gbps": moved / t / 1e6}]
    factors = tuple(hadamard_factors(d))
    attn = torch.randn(m, d, device="cuda").half()
    a_q, a_s = torch.empty(m, d, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
    choice = hq.kernel_choice(m, d, factors, None, False)
    had = hq.build_choice(choice, d, factors, None, 8, 0.9, False)
    t = bench(lambda: had(attn, a_q, a_s))
    moved = attn.numel() * 2 + a_q.numel() + m * 4
    n_o = width  # o_proj writes the widened residual
    wq = ref.pack_int4(torch.randint(-8, 8, (n_o, d), device="cuda", dtype=torch.int8))
    ws, y = torch.rand(n_o, device="cuda").half(), torch.empty(m, n_o, device="cuda").half()
    t_fused = bench(lambda: (had(attn, a_q, a_s), gemm_dispatch.w4ax_linear(a_q, a_s, wq, ws, out=y)))
    xb, wb = torch.randn(m, d, device="cuda").bfloat16(), torch.randn(n_o, d, device="cuda").bfloat16()
    t_bf16 = bench(lambda: xb @ wb.T)
    rows.append({"model": model, "kernel": "hadamard_o", "dispatch": list(choice), "m": m, "n": d,
                 "factors": list(factors), "ms": t, "gbps": moved / t / 1e6,
                 "with_gemm": {"n": n_o, "k": d, "ms": t_fused, "bf16_ms": t_bf16, "speedup_vs_bf16": t_bf16 / t_fused}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only")
    ap.add_argument("--gemm-ms", default="", help="only the GEMM rows, at these token counts (e.g. 2048,8192)")
    args = ap.parse_args()
    ms = [int(m) for m in args.gemm_ms.split(",")] if args.gemm_ms else MS
    copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * copy.numel() / bench(lambda: copy.clone()) / 1e6
    print(f"device copy: {copy_gbps:.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tilelang": __import__("tilelang").__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "gemm": []}
    def save():  # after every section: a run cut short by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    models = ["llama-3-8b"] if args.quick else list(MODELS)
    result["quantize"] = []
    for model in ([] if args.gemm_ms else models):
        for m in (2048, 8192):
            for row in bench_quantize(model, m):
                result["quantize"].append(row)
                g = row.get("with_gemm")
                print(f"{model:11s} {row['kernel']:17s} M={m:5d}: {row['ms'] * 1e3:8.1f} us {row['gbps']:6.0f} GB/s "
                      f"({row['gbps'] / copy_gbps:4.0%} of copy)" + (
                          f"; + GEMM {g['n']}x{g['k']}: {g['ms'] * 1e3:8.1f} us, "
                          f"bf16 {g['bf16_ms'] * 1e3:8.1f} us x{g['speedup_vs_bf16']:.2f}" if g else ""), flush=True)
    save()
    def rank_of(name):  # the outlier path runs on the norm-fed linears
        return RANK if name in ("qkv", "gate_up") else 0

    shapes = [(n, k, rank_of(name)) for model in models for name, (n, k) in MODELS[model].items()]
    gemm_dispatch.prebuild([(m, n, k, rank, False, "float16") for n, k, rank in shapes for m in ms])
    gemm_dispatch._build_all([spec for n, k, rank in shapes for m in ms
                              for _, spec in alternative_kernels(m, n, k, rank)])
    for model in models:
        for name, (n, k) in MODELS[model].items():
            rank = rank_of(name)
            for m in ms:
                row = {"model": model, "linear": name,
                       **bench_gemm(m, n, k, rank, with_reference=m in (1, 2048) and model == "llama-3-8b")}
                result["gemm"].append(row)
                print(f"{model:11s} {name:8s} M={m:5d} N={n:5d} K={k:5d} r={rank:3d}: {row['ms'] * 1e3:8.1f} us "
                      f"{row['tops']:7.1f} TOPS {row['gbps']:7.0f} GB/s ({row['gbps'] / copy_gbps:4.0%} of copy)  "
                      f"bf16 {row['bf16_ms'] * 1e3:8.1f} us  x{row['speedup_vs_bf16']:.2f}" + (
                          f" | graph {row['graph_ms'] * 1e3:6.1f} us {row['graph_gbps'] / copy_gbps:4.0%} of copy,"
                          f" bf16 {row['graph_bf16_ms'] * 1e3:6.1f} us x{row['graph_speedup_vs_bf16']:.2f}"
                          if "graph_ms" in row else "") + (
                          "".join(f" | {v} {row[v + '_ms'] * 1e3:8.1f} us {row[v + '_tops']:7.1f} TOPS"
                                  f" (max |diff| {row[v + '_max_abs_diff']:.1e})" if v + "_ms" in row
                                  else f" | {v} failed: {row[v + '_error']}" if v + "_error" in row else ""
                                  for v in ("ws", "pipelined", "rs", "rs_s3", "rs_t128", "rs_k256")) + "".join(
                          f" | {v} graph {row[v + '_graph_ms'] * 1e3:6.1f} us {row[v + '_graph_gbps'] / copy_gbps:4.0%} of copy"
                          f" (max |diff| {row[v + '_max_abs_diff']:.1e})" if v + "_graph_ms" in row
                          else f" | {v} failed: {row[v + '_error']}" if v + "_error" in row else ""
                          for v in ("decode_ws", "decode_pipelined", "decode_rs", "decode_rs1", "decode_resident2"))),
                      flush=True)
        save()


if __name__ == "__main__":
    main()
