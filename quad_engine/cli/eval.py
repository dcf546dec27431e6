"""`quad-eval ppl MODEL`: perplexity of a packed checkpoint or of its FP16 source."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from quad_engine.config import CONFIG_NAME, ConfigError
from quad_engine.data import HUB_DATASETS, DataError, eval_windows, load_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quad-eval", description="Evaluate a QUAD checkpoint or an FP16 baseline.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity over consecutive windows of a text",
                         description="Perplexity over consecutive non-overlapping windows (as GPTQ/QuaRot report it).")
    ppl.add_argument("model", metavar="MODEL",
                     help="a packed checkpoint directory (reference backend), or an FP16 source: HF model "
                          "directory, .gguf file or hub id (transformers)")
    text = ppl.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="a local .txt or .jsonl(.gz) file")
    text.add_argument("--dataset", choices=HUB_DATASETS, help="a dataset loaded through `datasets` (needs network)")
    ppl.add_argument("--seqlen", type=int, default=1024, help="window length in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    ppl.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ppl.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    ppl.add_argument("--int8-head", action=argparse.BooleanOptionalAction, default=True,
                     help="a checkpoint's embedding and lm_head as int8 rows, as the engine runs it by default "
                          "(--no-int8-head: the checkpoint's float16 tables)")
    return p


def load_for_eval(model: str, device: str, int8_head: bool = True):
    """(logits function, tokenizer, description) for a checkpoint (with the engine's int8
    embedding / lm_head unless int8_head is False) or an FP16 source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if (path / CONFIG_NAME).is_file():
        from quad_engine.checkpoint import load_model
        quad = load_model(path, device=device)
        if int8_head:
            quad.use_int8_head()
        what = f"quad:{path.name}" + ("" if int8_head else " (float16 head)")
        return quad, AutoTokenizer.from_pretrained(str(path)), what
    dtype = torch.float32 if device == "cpu" else torch.float16
    if path.suffix == ".gguf" and path.is_file():
        kw = dict(gguf_file=path.name)
        where = str(path.parent)
    elif path.is_dir() or "/" in model:
        kw, where = {}, model
    else:
        raise FileNotFoundError(f"{model}: no such checkpoint, model directory, .gguf file or hub id")
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).to(device).eval()
    return (lambda ids: hf(ids).logits), AutoTokenizer.from_pretrained(where, **kw), f"fp16:{path.name}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from quad_engine.eval.perplexity import perplexity
    started = time.time()
    try:
        model_fn, tokenizer, what = load_for_eval(args.model, device, args.int8_head)
        source = args.text or args.dataset
        windows = eval_windows(tokenizer, load_text(source, split="test"), args.seqlen, args.max_tokens)
    except (FileNotFoundError, OSError, DataError, ConfigError, ValueError) as e:
        print(f"quad-eval: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    ppl = perplexity(model_fn, windows, args.batch_size, device)
    seconds = time.time() - started
    n, seqlen = windows.shape
    print(f"ppl {ppl:.3f} | {n * seqlen} tokens in {n} windows of {seqlen} | {what} | {seconds:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl": ppl, "tokens": n * seqlen, "windows": n, "seqlen": seqlen,
                                               "model": args.model, "text": source, "seconds": seconds}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
