"""`quad-bench`: prefill / decode latency and throughput of QUAD against the fp16 path and transformers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quad_engine.synthetic import ARCHITECTURES


def shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list like 1x512,4x2048, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quad-bench", description="Latency of QUAD W4A4 / W4A4A8 against the engine's "
                                "fp16 path and Hugging Face transformers, same device, same run.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama-3-8b",
                     help="random weights of this architecture, packed like the converter (default llama-3-8b)")
    src.add_argument("--checkpoint", help="a packed checkpoint (system 'quad'; fp16 / hf need --arch)")
    p.add_argument("--preset", choices=["quad-reference"], default=None,
                   help="quad-reference: the QUAD reference speed script's configuration (llama-2-13b, "
                        "prefill batch 1, 2, 4, 8, 16 x 2048 tokens), to set the numbers beside it")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (tests)")
    p.add_argument("--systems", default="quad-w4a4,quad-w4a4a8,fp16,hf",
                   help="comma-separated: quad-w4a4, quad-w4a4a8, fp16, hf (default all); quad with --checkpoint; "
                        "quad-w4a4-unfused / quad-w4a4a8-unfused run the fused kernel variants' unfused "
                        "counterparts (QUAD_FUSE=0); quad-w4a4-head16 / quad-w4a4a8-head16 keep the embedding "
                        "and lm_head float16 (the quad systems: int8 rows, the engine's default)")
    p.add_argument("--prefill", type=shapes, default=None, help="batch x prompt tokens list (default "
                   "1x512,1x2048,4x2048,16x2048,1x8192; '' for none)")
    p.add_argument("--decode", type=shapes, default=None, help="batch x context list (default "
                   "1x1024,8x1024,32x1024,128x1024,1x4096,32x4096; '' for none)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--throughput", type=int, default=64, help="requests in the throughput run (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out-dir", default="bench/results", help="where JSON, markdown and PNG go (default bench/results)")
    p.add_argument("--name", default=None, help="file stem (default quad-bench_<arch>_<device>_<date>)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from quad_engine import bench, bench_report

    if args.preset == "quad-reference":
        args.arch = "llama-2-13b"
        args.prefill = args.prefill or [(b, 2048) for b in (1, 2, 4, 8, 16)]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    allowed = ("quad",) if args.checkpoint else bench.SYSTEMS + bench.EXTRA_SYSTEMS
    unknown = [s for s in systems if s not in allowed]
    if unknown:
        print(f"quad-bench: error: unknown system(s) {unknown}; expected {list(allowed)}", file=sys.stderr)
        return 2
    plan = bench.BenchPlan(arch=args.arch, layers=args.layers, systems=systems, device=device,
                           decode_steps=args.decode_steps, throughput_requests=args.throughput, repeats=args.repeats,
                           checkpoint=args.checkpoint,
                           overrides={"vocab_size": args.vocab} if args.vocab else {})
    if args.prefill is not None:  # an empty list measures no prefill
        plan.prefill = args.prefill
    if args.decode is not None:
        plan.decode = args.decode
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"quad-bench_{args.arch}_{device}_{time.strftime('%Y-%m-%d')}"
    partial = out_dir / f"{stem}.partial.json"

    def save_partial(result: dict) -> None:  # a run cut short keeps the systems it measured
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(partial)

    started = time.time()
    result = bench.run(plan, progress=lambda msg: print(f"[{time.time() - started:7.1f} s] {msg}", file=sys.stderr),
                       after_system=save_partial)
    partial.unlink(missing_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    table = bench_report.markdown(result)
    (out_dir / f"{stem}.md").write_text(table)
    if not bench_report.plot(result, out_dir / f"{stem}.png"):
        print("quad-bench: matplotlib is not installed: no plot written", file=sys.stderr)
    print(table)
    if result.get("failed"):
        print(f"quad-bench: {len(result['failed'])} system(s) failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
