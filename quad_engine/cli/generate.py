"""`quad-generate CHECKPOINT`: generate text from a packed QUAD checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quad_engine.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quad-generate", description="Generate text with a packed QUAD checkpoint "
                                "(TileLang kernels on a GPU, the PyTorch reference on the CPU).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory written by quad-convert "
                   "(with --fp16: a Hugging Face model directory, .gguf file or hub id)")
    p.add_argument("--fp16", action="store_true", help="run an unquantized Hugging Face model through the same "
                   "engine (float16 weights and paged float16 KV cache): the baseline")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="prompts, one per line (.txt) or one JSON object with a \"prompt\" "
                   "field per line (.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=-1, help="-1: off (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    p.add_argument("--json", action="store_true", help="write one JSON object per prompt (JSONL) to stdout")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="prompt tokens a prefill step computes (default 8192); a longer prompt prefills in "
                        "chunks of this size, which bounds a step's activation memory")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size; default: see "
                   "--gpu-memory-utilization on a GPU, room for --max-num-seqs full sequences on the CPU")
    p.add_argument("--int8-head", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the embedding and lm_head as int8 rows (half their memory, no measurable "
                   "perplexity cost on SmolLM2; QUAD checkpoints only; default on, --no-int8-head keeps "
                   "them float16)"),
    p.add_argument("--no-cuda-graph", action="store_true", help="run every step eagerly instead of replaying "
                   "captured CUDA graphs (decode: one per batch bucket; QUAD prefills of up to 2048 tokens: "
                   "one set per token bucket)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts file {path} not found")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            prompts += [json.loads(line)["prompt"] for line in lines]
        else:
            prompts += lines
    if not prompts and not sys.stdin.isatty():
        prompts += [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt, --prompts-file or text on stdin")
    return prompts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from quad_engine.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_new_tokens, stop=args.stop)
        prompts = read_prompts(args)
    except ValueError as e:
        print(f"quad-generate: error: {e}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).exists() and not (args.fp16 and "/" in args.checkpoint):
        print(f"quad-generate: error: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2
    from quad_engine.checkpoint import CheckpointError
    from quad_engine.engine import LLM

    try:
        llm = LLM(args.checkpoint, device=args.device, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_gb=args.kv_cache_gb,
                  gpu_memory_utilization=args.gpu_memory_utilization, fp16=args.fp16,
                  cuda_graph=not args.no_cuda_graph, int8_head=args.int8_head)
        shown = list(prompts)  # what the user typed, also with --chat
        if args.chat:
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                         add_generation_prompt=True) for p in prompts]
        groups = [[i] for i in range(len(prompts))] if args.stream else [list(range(len(prompts)))]
        for group_ids in groups:
            group = [prompts[i] for i in group_ids]
            stream = (lambda i, delta: print(delta, end="", flush=True)) if args.stream else None
            outputs, stats = llm.generate(group, params, on_token=stream)
            if args.stream:
                print()
            for i, out in zip(group_ids, outputs):
                if args.json:
                    print(json.dumps({"prompt": shown[i], "text": out.text, "prompt_tokens": len(out.prompt_token_ids),
                                      "generated_tokens": len(out.token_ids), "finish_reason": out.finish_reason}))
                elif not args.stream:  # a completion continues its prompt; a chat reply goes below it
                    print(f"{shown[i]}{chr(10) if args.chat else ''}{out.text}\n")
            prefill_rate = stats.prefill_tokens / stats.prefill_s if stats.prefill_s else 0.0
            decode_rate = stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0
            generated = sum(len(o.token_ids) for o in outputs)
            print(f"prompt tokens {stats.prefill_tokens} ({prefill_rate:.1f} tok/s prefill), generated tokens "
                  f"{generated} ({decode_rate:.1f} tok/s decode), device {llm.device}", file=sys.stderr)
    except (ConfigError, CheckpointError, ValueError, NotImplementedError, OSError) as e:
        print(f"quad-generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
