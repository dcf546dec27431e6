"""Quick engine check on the GPU: a small random model, eager decode then CUDA-graph decode,
greedy tokens compared. Run with CUDA_LAUNCH_BLOCKING=1 to locate a device-side failure."""

import argparse
import random
import traceback

import torch

from quad_engine.engine import LLM
from quad_engine.sampling import SamplingParams
from quad_engine.synthetic import synthetic_model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mode", default="w4a4a8")
    args = p.parse_args()
    model = synthetic_model(args.arch, device="cuda", num_layers=args.layers, mode=args.mode)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(5, 150))] for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        try:
            llm = LLM(model=model, device="cuda", num_blocks=64, max_model_len=512, cuda_graph=graphs)
            out, _ = llm.generate(prompts, params)
            torch.cuda.synchronize()
            results[graphs] = [o.token_ids for o in out]
            print(f"cuda_graph={graphs}: {results[graphs]}", flush=True)
        except Exception:
            traceback.print_exc()
            return 1
    print("identical" if results[False] == results[True] else "DIFFERENT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
