"""Peak memory of quad-convert on a random-weight model with real layer shapes.

Writes a Hugging Face directory of random bf16 weights with the given shapes and layer count
(tensor by tensor, so this script itself stays small), converts it in a child process and prints
that process's peak RSS. Run it at two depths to show the converter's memory does not grow with
the number of layers:

    python scripts/peak_rss.py --shape llama-3-8b --layers 2 --work /tmp/rss
    python scripts/peak_rss.py --shape llama-3-8b --layers 4 --work /tmp/rss
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192),
}


def write_random_model(directory: Path, shape: str, layers: int) -> None:
    cfg = LlamaConfig(num_hidden_layers=layers, torch_dtype="bfloat16", tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"], **SHAPES[shape])
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd

    def rand(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    weight_map = {}
    top = {"model.embed_tokens.weight": rand(cfg.vocab_size, d), "lm_head.weight": rand(cfg.vocab_size, d),
           "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    save_file(top, str(directory / "model-top.safetensors"))
    weight_map.update({k: "model-top.safetensors" for k in top})
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                 p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                 p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                 p + "mlp.down_proj.weight": rand(d, f), p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}
        name = f"model-layer{i}.safetensors"
        save_file(layer, str(directory / name))
        weight_map.update({k: name for k in layer})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import byte_tokenizer  # any tokenizer whose ids fit the vocabulary will do for calibration
    byte_tokenizer().save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", required=True, help="scratch directory (random model + checkpoint)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(args.work)
    src = work / f"{args.shape}-{args.layers}L"
    if not (src / "config.json").exists():
        write_random_model(src, args.shape, args.layers)
    out = work / f"{args.shape}-{args.layers}L-quad"
    cmd = [sys.executable, "-m", "converter.cli", str(src), str(out), "--force", "--quiet", "--rank", str(args.rank),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    started = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    weights_gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1024**3
    print(json.dumps({"shape": args.shape, "layers": args.layers, "source_bf16_gb": round(weights_gb, 2),
                      "peak_rss_gb": round(peak_gb, 2), "seconds": round(seconds, 1),
                      "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device}))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
