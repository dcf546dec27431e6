"""Perplexity table for SmolLM2-135M-Instruct: FP16, RTN, QuaRot and QUAD at W4A4 / W4A4A8, KV16 / KV4.

Calibrates on the bundled Emma excerpt and measures perplexity on the bundled Sense and Sensibility
excerpt (a different novel) in 1024-token windows. Writes JSON and the markdown table of
docs/results.md. Meant for a GPU (minutes); on CPU it takes hours.

    python scripts/smollm2_results.py --gguf PATH --out results_dir [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter.pipeline import ConvertOptions, convert, peak_rss_gb
from quad_engine.checkpoint import load_model
from quad_engine.data import DEMO_CALIB_TEXT, DEMO_EVAL_TEXT, eval_windows, load_text
from quad_engine.eval.perplexity import perplexity

# (label, options); every quantized row is evaluated with KV16 and KV4 from one conversion.
ROWS = [
    ("RTN W4A4 (no rotation)", dict(rank=0, mode="w4a4", weight_quant="rtn", rotation="none", mse_clip=False)),
    ("QuaRot + GPTQ W4A4", dict(rank=0, mode="w4a4")),
    ("QuaRot + GPTQ W4A4A8", dict(rank=0, mode="w4a4a8")),
    ("QUAD r=32 + GPTQ W4A4", dict(rank=32, mode="w4a4")),
    ("QUAD r=32 + GPTQ W4A4A8", dict(rank=32, mode="w4a4a8")),
    ("QUAD r=64 + GPTQ W4A4", dict(rank=64, mode="w4a4")),
    ("QUAD r=64 + GPTQ W4A4A8", dict(rank=64, mode="w4a4a8")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True, help="where the JSON and markdown results go")
    ap.add_argument("--work", default=None, help="where checkpoints go (default: a temporary directory)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=None, help="eval tokens (default: the whole excerpt)")
    ap.add_argument("--only", default=None, help="comma-separated row indices to run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="smollm2-results-"))
    gguf = Path(args.gguf)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    windows = eval_windows(tokenizer, load_text(str(DEMO_EVAL_TEXT)), args.seqlen, args.max_tokens)
    n_tokens = windows.numel()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "eval_text": DEMO_EVAL_TEXT.name,
               "calib_text": DEMO_CALIB_TEXT.name, "eval_tokens": n_tokens, "seqlen": args.seqlen,
               "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "git": _git_commit(), "rows": []}

    def record(row: dict) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "smollm2_results.json").write_text(json.dumps(results, indent=1) + "\n")

    def run_ppl(fn) -> float:
        return perplexity(fn, windows, device=args.device, progress=False)

    if args.only is None or "fp16" in args.only.split(","):
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float16).to(args.device).eval()
        record({"label": "FP16 (dequantized GGUF)", "kv": 16, "ppl": run_ppl(lambda ids: hf(ids).logits)})
        del hf

    for index, (label, overrides) in enumerate(ROWS):
        if args.only is not None and str(index) not in args.only.split(","):
            continue
        opts = ConvertOptions(nsamples=args.nsamples, seqlen=args.calib_seqlen, device=args.device,
                              calib=str(DEMO_CALIB_TEXT), force=True, **overrides)
        started = time.time()
        ckpt = convert(str(gguf), work / f"ckpt{index}", opts, progress=False)
        seconds = time.time() - started
        model = load_model(ckpt, device=args.device)
        for kv in (16, 4):
            model.cfg.kv_bits = kv  # the KV cache setting is a run-time choice; weights are the same
            record({"label": label, "kv": kv, "ppl": run_ppl(model), "convert_seconds": round(seconds, 1),
                    "peak_rss_gb": round(peak_rss_gb(), 2), **overrides})
        del model

    _write_markdown(results, out / "smollm2_results.md")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_markdown(results: dict, path: Path) -> None:
    fp16 = next((r["ppl"] for r in results["rows"] if r["label"].startswith("FP16")), None)
    lines = ["| method | KV16 ppl | KV4 ppl | KV4 / FP16 |", "|---|---|---|---|"]
    by_label: dict[str, dict[int, float]] = {}
    for r in results["rows"]:
        by_label.setdefault(r["label"], {})[r["kv"]] = r["ppl"]
    for label, ppl in by_label.items():
        kv4 = ppl.get(4)
        ratio = f"{kv4 / fp16:.3f}x" if (kv4 and fp16) else "-"
        lines.append(f"| {label} | {ppl.get(16, float('nan')):.2f} | "
                     f"{kv4 if kv4 is None else f'{kv4:.2f}'} | {ratio} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
