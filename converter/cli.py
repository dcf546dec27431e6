"""`quad-convert SRC OUT_DIR`: a Hugging Face model (directory or hub id) or a GGUF file -> packed checkpoint."""

from __future__ import annotations

import argparse
import sys
import warnings

from converter.pipeline import ConvertOptions, convert, peak_rss_gb
from converter.sources import SourceError
from converter.write import OutputExistsError
from quad_engine.config import MODES


def build_parser() -> argparse.ArgumentParser:
    d = ConvertOptions()
    p = argparse.ArgumentParser(
        prog="quad-convert",
        description="Convert a Llama / Qwen2 model to a packed QUAD checkpoint (int4 weights, int4/int8 "
                    "activations, fp16 outlier channels, int4 KV cache), one decoder layer at a time.")
    p.add_argument("src", metavar="SRC", help="local HF model directory, .gguf file, or hub id (needs network)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must be empty or absent, see --force)")
    p.add_argument("--rank", type=int, default=d.rank,
                   help="r, fp16 outlier channels moved out by QUAD's projection; 0 gives plain QuaRot "
                        f"(default {d.rank})")
    p.add_argument("--mode", choices=sorted(MODES), default=d.mode,
                   help="w4a4: every linear input int4; w4a4a8: o_proj/down_proj inputs int8; w16a16: no "
                        f"quantization, only the exact transforms (checks and debugging) (default {d.mode})")
    p.add_argument("--kv-bits", type=int, choices=(4, 16), default=d.kv_bits, help=f"KV cache bits (default {d.kv_bits})")
    p.add_argument("--weight-quant", choices=("gptq", "rtn"), default=d.weight_quant,
                   help=f"weight quantizer (default {d.weight_quant})")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help=f"weights per scale along the input dim; -1: one scale per output row (default {d.group_size})")
    p.add_argument("--act-clip", type=float, default=d.act_clip,
                   help=f"per-token activation clip ratio (default {d.act_clip})")
    p.add_argument("--kv-clip", type=float, default=d.kv_clip, help=f"KV cache clip ratio (default {d.kv_clip})")
    p.add_argument("--rotation", choices=("hadamard", "none"), default=d.rotation,
                   help="hadamard: QuaRot's rotations; none: no rotation at all, the naive baseline "
                        f"(default {d.rotation})")
    p.add_argument("--calib", default=None,
                   help="calibration text: a local .txt/.jsonl(.gz) file or a datasets name (c4, wikitext2; "
                        "needs network); default: the bundled English prose excerpt")
    p.add_argument("--nsamples", type=int, default=d.nsamples, help=f"calibration sequences (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"calibration sequence length (default {d.seqlen})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for calibration windows and rotations (default {d.seed})")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without act-order")
    p.add_argument("--no-mse-clip", dest="mse_clip", action="store_false",
                   help="weight scales from max|w| instead of an MSE-optimal clip search")
    p.add_argument("--percdamp", type=float, default=d.percdamp, help=f"GPTQ damping (default {d.percdamp})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where calibration and GPTQ run (default: cuda if available)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=d.dtype,
                   help=f"dtype of the unquantized tensors (default {d.dtype})")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = ConvertOptions(
        rank=args.rank, mode=args.mode, kv_bits=args.kv_bits, weight_quant=args.weight_quant,
        group_size=args.group_size, act_clip=args.act_clip, kv_clip=args.kv_clip, rotation=args.rotation,
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, act_order=args.act_order,
        mse_clip=args.mse_clip, percdamp=args.percdamp, device=device, dtype=args.dtype, force=args.force)
    if opts.rank < 0:
        print("quad-convert: error: --rank must be >= 0", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            out = convert(args.src, args.out_dir, opts, progress=not args.quiet)
    except (SourceError, OutputExistsError, ValueError) as e:
        print(f"quad-convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quad-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out} (peak RSS {peak_rss_gb():.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
