"""Kernel benchmark: W4A4 / W4A8 GEMM (+ fused outlier path) against cuBLAS bf16 and torch._int_mm.

Every baseline is timed in the same run on the same GPU (CUDA-event timing through
triton.testing.do_bench, median of repeated runs). Prints a table and writes JSON.

    python bench/kernels.py --out bench/results/kernels.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from triton.testing import do_bench

from kernels_tl import reference as ref
from kernels_tl.gemm import tiles_for, w4ax_gemm

MODELS = {
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4160, 4096), "gate_up": (28672, 4096), "down": (4160, 14336)},
    "qwen2.5-7b": {"qkv": (4608, 3584), "o": (3648, 3584), "gate_up": (37888, 3584), "down": (3648, 18944)},
    "smollm2": {"qkv": (960, 576), "o": (640, 576), "gate_up": (3072, 576), "down": (640, 1536)},
}
MS = [1, 4, 16, 64, 256, 1024, 2048, 8192]
RANK = 64


def bench_one(m: int, n: int, k: int, act_bits: int, rank: int) -> dict:
    dev = "cuda"
    xq = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
    wq = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
    xs, ws = torch.rand(m, device=dev), torch.rand(n, device=dev).half()
    r = max(rank, 16)
    xo, wo = torch.randn(m, r, device=dev).half(), torch.randn(n, r, device=dev).half()
    bias, y = torch.zeros(n, device=dev).half(), torch.empty(m, n, device=dev).half()
    a, w = xq, ref.pack_int4(wq)
    kernel = w4ax_gemm(n, k, rank, act_bits, False, "float16", **tiles_for(m, n, k))
    t_ours = do_bench(lambda: kernel(a, xs, w, ws, xo, wo, bias, y), warmup=25, rep=100)
    xb, wb = torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    t_bf16 = do_bench(lambda: xb @ wb.T, warmup=25, rep=100)
    t_int8 = None
    if m > 16:  # torch._int_mm needs M > 16
        x8, w8t = xq.contiguous(), wq.T  # [K, N] column-major: the layout _int_mm is fast on
        t_int8 = do_bench(lambda: torch._int_mm(x8, w8t), warmup=25, rep=100)
    ops = 2 * m * n * k
    bytes_read = n * k // 2 + m * k + m * n * 2 + (n + m) * rank * 2
    return {"m": m, "n": n, "k": k, "act_bits": act_bits, "rank": rank, "ms": t_ours, "bf16_ms": t_bf16,
            "int_mm_ms": t_int8, "tops": ops / t_ours / 1e9, "gbps": bytes_read / t_ours / 1e6,
            "speedup_vs_bf16": t_bf16 / t_ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only")
    args = ap.parse_args()
    copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * copy.numel() / do_bench(lambda: copy.clone(), warmup=5, rep=20) / 1e6
    rows = []
    models = ["llama-3-8b"] if args.quick else list(MODELS)
    for model in models:
        for name, (n, k) in MODELS[model].items():
            rank = RANK if name in ("qkv", "gate_up") else 0
            for act_bits in ((4,) if name in ("qkv", "gate_up") else (4, 8)):
                for m in MS:
                    row = {"model": model, "linear": name, **bench_one(m, n, k, act_bits, rank)}
                    rows.append(row)
                    print(f"{model:11s} {name:8s} a{act_bits} M={m:5d} N={n:5d} K={k:5d}: {row['ms'] * 1e3:8.1f} us "
                          f"{row['tops']:7.1f} TOPS {row['gbps']:7.0f} GB/s  bf16 {row['bf16_ms'] * 1e3:8.1f} us "
                          f"x{row['speedup_vs_bf16']:.2f}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "copy_gbps": copy_gbps, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
