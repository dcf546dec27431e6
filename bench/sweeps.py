"""Kernel variant sweeps at Llama-3-8B shapes, each variant checked against the first (or the
default) on the same inputs and timed in the same run: the prefill ones of bench/sweeps_prefill.py
(GEMM tiles, the GEMM's outlier tiles, panels, K stages and epilogue, the fused RoPE + KV store),
the Hadamard+quantize ones of bench/sweeps_quantize.py, and here split-K decode GEMMs and the
producer-unpack decode GEMM's tiles (in CUDA graphs over weight copies larger than L2) and the
dp4a GEMV's shapes. The timing helpers and shapes are
bench/kernels.py's. Writes JSON after every section, so a run cut short by a time limit keeps what
it measured.

    python bench/sweeps.py --out sweep.json \
        (--hadamard | --decode | --decode-ws | --gemv | --prefill | --hadamard-stream | --rs-prefetch | --rope-store
         | --rs-panel | --rs-stages | --rs-epilogue | --hadamard-square | --norm-threads | --all)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import MODELS, bench, bench_graph, build_all, copies_beyond_l2, operands  # noqa: E402
from sweeps_prefill import (sweep_prefill, sweep_rope_store, sweep_rs_epilogue, sweep_rs_panel,  # noqa: E402
                            sweep_rs_prefetch, sweep_rs_stages)
from sweeps_quantize import sweep_hadamard, sweep_hadamard_stream, sweep_norm_threads  # noqa: E402

from kernels_tl import gemm_decode, gemm_dispatch, gemm_plans, gemv  # noqa: E402
from kernels_tl import reference as ref  # noqa: E402


def _measured(row: dict, kern, check, call, wps, weight_bytes: int, label: str) -> dict:
    """One decode variant's row: check(kern) -> its correctness fields (it runs the kernel once on the
    first weight copy), then call(kern, w) timed back to back in a CUDA graph over the weight copies
    wps, GB/s on the packed weight. A build error (kern is the exception) or a failed call is
    reported in the row, not raised."""
    try:
        if isinstance(kern, Exception):
            raise kern
        row.update(check(kern))
        t = bench_graph([lambda w=w: call(kern, w) for w in wps])
        row.update(ms=t, gbps=weight_bytes / t / 1e6)
    except Exception as e:  # reported, not fatal
        row["error"] = str(e).splitlines()[0][:200]
    print(f"  sweep {label} {row}", flush=True)
    return row


def sweep_decode(n: int, k: int, m: int) -> list[dict]:
    """Split-K variants of the decode kernel at one shape and token count (integer part alone: the
    int32 workspace is not zeroed between calls, its sums only wrap): K splits 1-8, K tiles 256-1024,
    pipeline depth 2-4, built for 1-3 blocks a SM, timed back to back in a CUDA graph over weight
    copies larger than L2 (as a decode step runs), with the dispatch's own plan marked. GB/s on the
    packed weight; each variant's int32 sums checked against the first variant's."""
    from kernels_tl.gemm_plans import SMEM_PER_SM, decode_plan, decode_smem

    xq, xs, wq, ws, _, _ = operands(m, n, k, 0)
    wps = [ref.pack_int4(wq)] + [ref.pack_int4(wq).clone() for _ in range(copies_beyond_l2(n * k // 2) - 1)]
    acc = torch.zeros(m, n, device="cuda", dtype=torch.int32)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    # (split, K tile, stages, blocks a SM): the warp-specialized kernel (1 block a SM) at every tile,
    # and the kernel built for 2 / 3 blocks a SM at the tiles whose shared memory allows it.
    variants = [(s, bk, st, mb) for mb in (1, 2, 3) for s in (1, 2, 4, 8)
                for bk, st in ((256, 2), (256, 3), (256, 4), (512, 2), (512, 3), (512, 4), (1024, 2))
                if k % (bk * s) == 0 and k // (bk * s) >= 2
                and (mb == 1 and (bk, st) != (256, 2) and (bk, st) != (256, 3)
                     or mb > 1 and decode_smem(block_m, bk, st) <= SMEM_PER_SM // mb - 1024)]
    plan = decode_plan(m, n, k, resident=1)  # the plan of these (shared-memory unpack) kernels
    builders = {v: (lambda v=v: gemm_decode.w4ax_gemm_splitk(n, k, v[0], block_m, 64, v[1], v[2], min_blocks=v[3]))
                for v in variants}
    built = build_all(builders)
    # The integer sums of one call on a zeroed workspace, the first variant's as the reference.
    want = []

    def exact(kern):
        acc.zero_()
        kern(xq, wps[0], acc)
        if not want:
            want.append(acc.clone())
        return {"exact": bool(torch.equal(acc, want[0]))}
    rows = []
    for variant in variants:
        split, bk, stages, blocks = variant
        row = {"n": n, "k": k, "m": m, "split": split, "block_k": bk, "stages": stages, "blocks_per_sm": blocks,
               "dispatch": variant == (plan["split"], plan["block_k"], plan["num_stages"], plan.get("min_blocks", 1))}
        rows.append(_measured(row, built[variant], exact, lambda kern, w: kern(xq, w, acc), wps, n * k // 2,
                              "decode"))
    return rows


def decode_ws_variants(n: int, k: int, m: int) -> list[tuple[int, int, int]]:
    """(K tile, TMA stages, unpacked tiles) of the producer-unpack decode kernel that one block
    covering K can run at this shape: at least as many K tiles as stages, shared memory (stages of
    activation and packed weight tiles, the unpacked tiles, the epilogue's float32 tile) within a
    SM's."""
    from kernels_tl.gemm_plans import SMEM_PER_SM
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    out = []
    for bk in (128, 256, 512):
        for stages in (2, 3, 4):
            for bufs in (1, 2):
                smem = stages * (block_m * bk + 64 * bk // 2) + bufs * 64 * bk + 64 * block_m * 4
                if k % bk == 0 and k // bk >= stages and bufs <= stages and smem <= SMEM_PER_SM - 1024:
                    out.append((bk, stages, bufs))
    return out


def sweep_decode_ws(n: int, k: int, m: int) -> list[dict]:
    """Tiles of the producer-unpack decode kernel (kernels_tl.gemm_ws.w4ax_gemm_decode_ws: one block
    covering K, the epilogue fused) at one shape and token count, beside the dispatch's kernel for
    the same problem: K tile, TMA stages and unpacked tiles (decode_ws_variants; up to ~113 KB two
    blocks share a SM), timed back to back in a CUDA graph over weight copies larger than L2, the
    full output compared with the dispatch's. GB/s on the packed weight."""
    from kernels_tl.gemm_ws import w4ax_gemm_decode_ws

    rank = 64 if n in (6144, 28672) else 0  # qkv / gate_up carry the outlier path
    xq, xs, wq, ws, xo, wo = operands(m, n, k, rank)
    if rank == 0:
        xo, wo = torch.zeros(m, 16, device="cuda").half(), torch.zeros(n, 16, device="cuda").half()
    wps = [ref.pack_int4(wq)] + [ref.pack_int4(wq).clone() for _ in range(copies_beyond_l2(n * k // 2) - 1)]
    bias = torch.zeros(n, device="cuda").half()
    want = torch.empty(m, n, device="cuda", dtype=torch.float16)
    gemm_dispatch.w4ax_linear(xq, xs, wps[0], ws, xo if rank else None, wo if rank else None, out=want)
    rows = [{"n": n, "k": k, "m": m, "kernel": "dispatch",
             "ms": bench_graph([lambda w=w: gemm_dispatch.w4ax_linear(xq, xs, w, ws, xo if rank else None,
                                                                      wo if rank else None, out=want)
                                for w in wps])}]
    rows[0]["gbps"] = n * k / 2 / rows[0]["ms"] / 1e6
    print(f"  sweep decode-ws {rows[0]}", flush=True)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    variants = decode_ws_variants(n, k, m)
    built = build_all({v: (lambda v=v: w4ax_gemm_decode_ws(n, k, rank, False, "float16", block_m, v[0], v[1], v[2]))
                       for v in variants})
    y = torch.empty_like(want)

    def close(kern):
        y.fill_(float("nan"))
        kern(xq, xs, wps[0], ws, xo, wo, bias, y)
        return {"max_abs_diff": float((y.float() - want.float()).abs().max())}
    for variant in variants:
        bk, stages, bufs = variant
        row = {"n": n, "k": k, "m": m, "kernel": "decode_ws", "block_k": bk, "stages": stages, "w_buffers": bufs}
        rows.append(_measured(row, built[variant], close, lambda kern, w: kern(xq, xs, w, ws, xo, wo, bias, y), wps,
                              n * k // 2, "decode-ws"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    sweeps = (("hadamard", "Hadamard+quantize launch shapes (o_proj and gated down_proj inputs)"),
              ("decode", "split-K decode GEMM variants (the four linears at 16 and 32 tokens)"),
              ("decode-ws", "producer-unpack decode GEMM tiles (qkv, gate_up at 16, 32, 64 tokens)"),
              ("gemv", "dp4a GEMV shapes (the four linears at 1, 4 and 8 tokens)"),
              ("prefill", "prefill GEMM tiles against the int8 ceiling (4096 tokens)"),
              ("hadamard-stream", "the streaming Hadamard+quantize kernel against the dispatch's (128-8192 tokens)"),
              ("rs-prefetch", "the prefill GEMM's outlier tiles by cp.async before the K loop, or after it"),
              ("rope-store", "the fused RoPE + KV store by tokens a warp (2048 and 8192 tokens)"),
              ("rs-panel", "the prefill GEMM's blocks in panels of token tiles (2048, 8192, 32768 tokens)"),
              ("rs-stages", "the prefill GEMM's K tiles, stages and fragments (gate_up, down and qkv at 2048 tokens, gate_up at 8192)"),
              ("hadamard-square", "the two-pass quantizer of square rows (4096) beside the one-block kernel, 1-8192 tokens"),
              ("rs-epilogue", "the prefill GEMM's epilogue scales staged in shared memory, with 3 or 4 K stages"),
              ("norm-threads", "the fused norm by threads a block, in its three decode modes (1-2048 tokens)"),
              ("all", "every sweep above"))
    for name, what in sweeps:
        ap.add_argument(f"--{name}", action="store_true", help=what)
    ap.add_argument("--gated-only", action="store_true", help="--hadamard-stream: the gated 14336-wide row alone")
    args = ap.parse_args()
    if not any(getattr(args, name.replace("-", "_")) for name, _ in sweeps):
        ap.error("choose a sweep: " + ", ".join(f"--{name}" for name, _ in sweeps))
    copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * copy.numel() / bench(lambda: copy.clone()) / 1e6
    print(f"device copy: {copy_gbps:.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tilelang": __import__("tilelang").__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    linears = MODELS["llama-3-8b"].values()
    if args.hadamard or args.all:
        result["sweep_hadamard"] = []
        for n, gated, ms in ((4096, False, None), (14336, True, None), (14336, False, (1, 16, 2048))):
            result["sweep_hadamard"] += sweep_hadamard(n, gated, **({"ms": ms} if ms else {}))
            save()
    if args.hadamard_stream or args.all:
        result["sweep_hadamard_stream"] = []
        for n, gated in ((14336, True),) + (() if args.gated_only else ((4096, False), (14336, False))):
            result["sweep_hadamard_stream"] += sweep_hadamard_stream(n, gated)
            save()
    if args.decode or args.all:
        result["sweep_decode"] = []
        for m in (32, 16):
            for n, k in linears:
                result["sweep_decode"] += sweep_decode(n, k, m)
                save()
    if args.decode_ws or args.all:
        result["sweep_decode_ws"] = []
        for m in (16, 32, 64):
            for n, k in linears:  # the problems one block covers K of (qkv, gate_up); o / down split K
                if gemm_plans.decode_plan(m, n, k)["split"] == 1:
                    result["sweep_decode_ws"] += sweep_decode_ws(n, k, m)
                    save()
    if args.gemv or args.all:
        result["sweep_gemv"] = {}
        for n, k in linears:
            result["sweep_gemv"][f"{n}x{k}"] = sweep_gemv(n, k)
            save()
    if args.rope_store or args.all:
        result["sweep_rope_store"] = []
        for tokens in (2048, 8192, 2053):
            result["sweep_rope_store"] += sweep_rope_store(tokens)
            save()
    if args.hadamard_square or args.all:  # the o_proj input of Llama-3-8B, decode to prefill sizes
        result["sweep_hadamard_square"] = sweep_hadamard_stream(4096, False, ms=(1, 16, 64, 128, 512, 2048, 8192))
        save()
    if args.norm_threads or args.all:
        result["sweep_norm_threads"] = sweep_norm_threads()
        save()
    if args.rs_prefetch or args.all:
        result["sweep_rs_prefetch"] = []
        for n, k, m in ((6144, 4096, 2048), (28672, 4096, 2048), (28672, 4096, 8192), (6144, 4096, 100),
                        (960, 576, 2053)):
            result["sweep_rs_prefetch"] += sweep_rs_prefetch(n, k, m)
            save()
    if args.rs_panel or args.all:
        result["sweep_rs_panel"] = []
        for m in (2048, 8192):
            for n, k in linears:
                result["sweep_rs_panel"] += sweep_rs_panel(n, k, m)
                save()
        result["sweep_rs_panel"] += sweep_rs_panel(28672, 4096, 32768)
        save()
        for k in (2048, 8192, 16384):  # time against K at a fixed grid: the part of a tile not in its K loop
            result["sweep_rs_panel"] += sweep_rs_panel(28672, k, 2048, panels=(0, 8))
            save()
    if args.rs_stages or args.all:
        result["sweep_rs_stages"] = []
        for n, k, m in ((28672, 4096, 2048), (4160, 14336, 2048), (6144, 4096, 2048), (28672, 4096, 8192)):
            result["sweep_rs_stages"] += sweep_rs_stages(n, k, m)
            save()
    if args.rs_epilogue or args.all:
        result["sweep_rs_epilogue"] = []
        for n, k, m in ((28672, 4096, 2048), (4160, 14336, 2048), (6144, 4096, 2048), (4160, 4096, 2048),
                        (28672, 4096, 8192), (6144, 4096, 2053), (4160, 4096, 300)):
            result["sweep_rs_epilogue"] += sweep_rs_epilogue(n, k, m)
            save()
    if args.prefill or args.all:
        result["sweep_prefill"] = {}
        for n, k in linears:
            result["sweep_prefill"][f"{n}x{k}"] = sweep_prefill(n, k, 4096)
            save()


if __name__ == "__main__":
    main()
