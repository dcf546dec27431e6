"""Where the host time of an engine prefill goes: the wall time of `generate` (one sampled token)
beside the device time of its kernels, then the same call under cProfile, by function. A prefill
whose wall time exceeds its device time by much waits on the host (Python between launches,
launches themselves; the step replays piecewise CUDA graphs unless QUAD_PREFILL_GRAPHS=0). Then the
step's eager forward alone, three ways: the host time to launch it (the
call returns before the GPU is done), its synchronized wall time, and the replay of the same
forward captured as one CUDA graph (the step without any host time: the bound a graphed prefill
could reach). Last, one graphed call's timeline under torch.profiler: the host's lead-in before the
first kernel, the device's busy time and gaps, the host's tail after the last kernel, and the
largest gaps. Writes host_profile_<batch>x<tokens>.txt under OUT_DIR.

    python3 scripts/gpu_host_profile.py OUT_DIR [--arch llama-3-8b] [--prefill 2048] [--batch 1]
"""

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from quad_engine import profiling
from quad_engine.engine import LLM
from quad_engine.sampling import SamplingParams
from quad_engine.synthetic import synthetic_model

ON_GPU = torch.cuda.is_available()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def eager_prefill():
    """Prefills without their graphs (QUAD_PREFILL_GRAPHS=0) inside the block."""
    return mock.patch.dict(os.environ, {"QUAD_PREFILL_GRAPHS": "0"})


def forward_timings(llm: LLM, run, repeats: int) -> list[str]:
    """Launch-only, synchronized and graph-replayed times of the prefill's forward (ms)."""
    captured = {}
    forward = llm._forward

    def recording(*a, **k):
        captured.setdefault("args", a)
        return forward(*a, **k)

    llm._forward = recording
    try:
        with eager_prefill():  # its launches are what is measured
            run()
    finally:
        llm._forward = forward
    args = captured["args"]
    launch, synced = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        forward(*args)
        launch.append(1e3 * (time.perf_counter() - t0))
        sync()
        synced.append(1e3 * (time.perf_counter() - t0))
    lines = [f"forward launch-only ms: median {statistics.median(launch):.2f}; synchronized: median "
             f"{statistics.median(synced):.2f}"]
    if not ON_GPU:
        return lines
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(*args)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    sync()
    try:
        with torch.cuda.graph(graph):
            forward(*args)
    except Exception as exc:  # a step that cannot be captured says why, the rest still stands
        return lines + [f"graph capture failed: {type(exc).__name__}: {exc}"]
    replays = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        graph.replay()
        sync()
        replays.append(1e3 * (time.perf_counter() - t0))
    return lines + [f"forward as one CUDA graph, replay ms: median {statistics.median(replays):.2f}, "
                    f"all {[round(r, 2) for r in replays]}"]


def timeline(run) -> list[str]:
    """One graphed generate call under torch.profiler (host and device on one clock): the host's
    lead-in before the first kernel, the device span with its busy time and gaps, the host's tail
    after the last kernel, and the largest gaps with the kernels either side of them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("generate_call"):
            run()
        sync()
    events = prof.events()
    call = next(e for e in events if e.name == "generate_call" and e.device_type == DeviceType.CPU)
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    if not kernels:
        return ["timeline: no device activity recorded"]
    gaps = profiling.device_gaps([(e.time_range.start, e.time_range.end) for e in kernels])
    first, end = kernels[0].time_range.start, max(e.time_range.end for e in kernels)
    idle, wall = sum(gap for gap, _ in gaps), call.time_range.end - call.time_range.start
    lines = [f"timeline (one graphed call, profiled; us): wall {wall:.0f}, host lead-in {first - call.time_range.start:.0f}, "
             f"device span {end - first:.0f} (busy {end - first - idle:.0f}, gaps {idle:.0f} in {len(gaps)}), "
             f"host tail {call.time_range.end - end:.0f}, {len(kernels)} device ops"]
    for gap, i in sorted(gaps, reverse=True)[:8]:
        lines.append(f"  gap {gap:7.1f} us after {kernels[i - 1].name[:70]} | before {kernels[i].name[:70]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--arch", default="llama-3-8b")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if ON_GPU else "cpu"
    model = synthetic_model(args.arch, device=device, num_layers=args.layers)
    llm = LLM(model=model, device=device, max_model_len=args.prefill + 8, kv_cache_gb=8 if ON_GPU else 0.25,
              max_num_seqs=args.batch)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(args.prefill)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def run() -> None:
        llm.generate(prompts, params)

    run()
    run()  # warm-up: builds, allocator
    walls = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        walls.append(1e3 * (time.perf_counter() - t0))
    lines_forward = forward_timings(llm, run, args.repeats)  # before any profiler session in this process
    lines_forward += timeline(run)
    with eager_prefill(), profiling.annotated_trace() as events:  # a replayed graph hides its kernels' ops
        run()
    parts = profiling.breakdown_by_op(events).get("prefill_ms", {})
    prof = cProfile.Profile()
    sync()
    prof.enable()
    run()
    sync()
    prof.disable()
    lines = [f"{args.arch} prefill {args.batch} x {args.prefill} on {torch.cuda.get_device_name() if ON_GPU else 'cpu'}",
             f"wall ms (generate, 1 token; {args.repeats} runs): median {statistics.median(walls):.2f}, "
             f"all {[round(w, 2) for w in walls]}",
             "device ms by op (profiled run): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())] + lines_forward
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(40)
        lines += ["", f"== cProfile by {key} (one generate call)", buf.getvalue()]
    text = "\n".join(lines)
    path = out / f"host_profile_{args.batch}x{args.prefill}.txt"
    path.write_text(text)
    print("\n".join(lines[:3 + len(lines_forward)]))


if __name__ == "__main__":
    main()
