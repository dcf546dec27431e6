"""Kernel-level profile of one engine prefill and of decode steps on the GPU: which kernels a step
runs, how many, and their device time. Writes tables under OUT_DIR.

    python3 scripts/gpu_profile_step.py OUT_DIR [--arch llama-3-8b] [--prefill 2048] [--context 1024]
        [--batch 1] [--no-int8-head]
"""

import argparse
import random
from pathlib import Path

import torch

from quad_engine import profiling
from quad_engine.engine import LLM
from quad_engine.sampling import SamplingParams
from quad_engine.synthetic import synthetic_model


ON_GPU = torch.cuda.is_available()


def kernel_times(events: list[dict]) -> dict[str, tuple[float, int]]:
    """"<op> | <kernel>" -> (device µs, calls) of every kernel, copy and memset that ran on the GPU
    (quad_engine.profiling.attribute); host µs of the ops on a machine without one, so that the
    script can be tried there."""
    if not ON_GPU:
        return {f"{op:<10} | host": (us, 1) for (_, op), us in profiling.cpu_op_times(events).items()}
    rows: dict[str, tuple[float, int]] = {}
    for (_, op, name), (us, n) in profiling.attribute(events).items():
        key = f"{op:<10} | {name}"
        t, c = rows.get(key, (0.0, 0))
        rows[key] = (t + us, c + n)
    return rows


def table(times: dict[str, tuple[float, int]], steps: int, minus: dict | None = None) -> str:
    """Per-step table; `minus` (another run's kernel_times) is subtracted first, to leave only
    the decode steps of a run that also prefilled."""
    minus = minus or {}
    rows = {k: (t - minus.get(k, (0, 0))[0], n - minus.get(k, (0, 0))[1]) for k, (t, n) in times.items()}
    rows = sorted(((k, t, n) for k, (t, n) in rows.items() if n > 0), key=lambda r: -r[1])
    total, kernels = sum(t for _, t, _ in rows), sum(n for _, _, n in rows)
    lines = [f"{steps} step(s): {total / steps / 1e3:.3f} ms device time and {kernels / steps:.0f} GPU ops a step",
             f"{'ms/step':>9} {'calls/step':>10}  name"]
    by_op: dict[str, float] = {}
    for k, t, _ in rows:
        by_op[k.split(" | ")[0].strip()] = by_op.get(k.split(" | ")[0].strip(), 0.0) + t
    lines.append("by op: " + ", ".join(f"{op} {t / steps / 1e3:.3f}" for op, t in sorted(by_op.items(), key=lambda x: -x[1])))
    for k, t, n in rows[:80]:
        lines.append(f"{t / steps / 1e3:9.3f} {n / steps:10.1f}  {k[:160]}")
    return "\n".join(lines)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def profiled(fn) -> dict:
    with profiling.annotated_trace() as events:
        fn()
    return kernel_times(events)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--arch", default="llama-3-8b")
    p.add_argument("--mode", default="w4a4a8")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--int8-head", action=argparse.BooleanOptionalAction, default=True,
                   help="int8 embedding and W8A8 lm_head, the engine's default (--no-int8-head: float16)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if ON_GPU else "cpu"
    model = synthetic_model(args.arch, device=device, mode=args.mode, num_layers=args.layers)
    llm = LLM(model=model, device=device, max_model_len=max(args.prefill, args.context) + args.steps + 8,
              kv_cache_gb=8 if ON_GPU else 0.25, max_num_seqs=max(args.batch, 1), int8_head=args.int8_head)
    rng = random.Random(0)
    greedy = dict(temperature=0, ignore_eos=True)
    long_prompt = [rng.randrange(1000) for _ in range(args.prefill)]
    ctx_prompts = [[rng.randrange(1000) for _ in range(args.context)] for _ in range(args.batch)]
    llm.generate([long_prompt], SamplingParams(max_tokens=2, **greedy))  # warm-up
    llm.generate(ctx_prompts, SamplingParams(max_tokens=args.steps, **greedy))
    sync()
    prefill = profiled(lambda: llm.generate([long_prompt], SamplingParams(max_tokens=1, **greedy)))
    (out / "profile_prefill.txt").write_text(table(prefill, 1))
    modes = (False, True) if ON_GPU else (False,)
    for graphs in modes:
        llm.use_cuda_graph = graphs
        llm.generate(ctx_prompts, SamplingParams(max_tokens=3, **greedy))  # warm-up / capture
        ctx_prefill = profiled(lambda: llm.generate(ctx_prompts, SamplingParams(max_tokens=1, **greedy)))
        times = []
        llm.step_hook = lambda dt, is_prefill: None if is_prefill else times.append(dt)
        both = profiled(lambda: llm.generate(ctx_prompts, SamplingParams(max_tokens=args.steps + 1, **greedy)))
        llm.step_hook = None
        name = "graph" if graphs else "eager"
        decode_ms = [round(1e3 * t, 3) for t in sorted(times)]
        text = table(both, args.steps, minus=ctx_prefill) + f"\n\nwall ms per decode step (sorted): {decode_ms}\n"
        (out / f"profile_decode_{name}.txt").write_text(text)
    print((out / "profile_prefill.txt").read_text().splitlines()[0])
    for name in ("eager", "graph")[:len(modes)]:
        print(name, (out / f"profile_decode_{name}.txt").read_text().splitlines()[0])


if __name__ == "__main__":
    main()
