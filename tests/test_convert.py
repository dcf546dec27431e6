"""Converter: exact invariance of the transforms, QUAD's projection, the packed checkpoint."""

import json
import re
from pathlib import Path

import pytest
import torch

from converter.pipeline import ConvertOptions, convert
from converter.rotate import projection_from_covariance, quad_q, residual_rotation
from quad_engine.checkpoint import load_model, load_tensors, tensor_schema
from quad_engine.config import QuadConfig
from tiny import VOCAB, save_tiny, tiny_model

DOCS = Path(__file__).parent.parent / "docs" / "checkpoint-format.md"


def calib_tokens(n=8, t=64, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,intermediate,tie", [("llama", 96, False), ("qwen2", 80, True)])
@pytest.mark.parametrize("rank", [0, 8])
def test_unquantized_conversion_matches_the_original_logits(tmp_path, arch, intermediate, tie, rank):
    src = save_tiny(tmp_path / "src", arch, intermediate=intermediate, tie=tie)
    opts = ConvertOptions(rank=rank, mode="w16a16", kv_bits=16, dtype="float32", nsamples=8, seqlen=64)
    out = convert(str(src), tmp_path / "out", opts, calib_tokens=calib_tokens(), progress=False)
    cfg = QuadConfig.load(out)
    assert cfg.width == 64 + rank and cfg.hadamard_down.size == intermediate
    assert cfg.hadamard_down.block is None  # 96 = 12*8 and 80 = 20*4 have exact Hadamards
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_model(arch, intermediate=intermediate, tie=tie)(ids).logits
        got = load_model(out)(ids)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-4, rel


def test_q_is_a_partial_isometry_and_rotation_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 96, generator=g, dtype=torch.float64)
    p = projection_from_covariance(x.T @ x, 16)
    q = quad_q(p)
    assert q.shape == (96, 112)
    assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-6)
    rot, info = residual_rotation(96, 16, seed=1)
    assert torch.allclose(rot @ rot.T, torch.eye(112, dtype=torch.float64), atol=1e-10)
    assert info["blocks"] == {"outlier": "hadamard", "main": "hadamard"}


def test_projection_removes_planted_outliers_that_rotation_only_spreads():
    g = torch.Generator().manual_seed(0)
    d, r, n = 128, 8, 8192
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    for ch in (3, 40, 77):   # massive channel outliers on a few tokens' worth of directions, as in LLMs
        x[:, ch] += 200 * torch.randn(n, generator=g, dtype=torch.float64)
    rot, _ = residual_rotation(d, r, seed=0)
    rotation_only = x @ rot[r:, r:]                                  # QuaRot: H_d alone
    m = quad_q(projection_from_covariance(x.T @ x, r)) @ rot        # QUAD: Q, then block_diag(H_r, H_d)
    quantized_part = (x @ m)[:, r:]
    ratio = float(rotation_only.abs().max() / quantized_part.abs().max())
    assert ratio >= 10, ratio


def test_quantized_checkpoint_matches_the_schema_and_the_format_document(tmp_path):
    src = save_tiny(tmp_path / "src", "qwen2", intermediate=96)
    opts = ConvertOptions(rank=8, mode="w4a4a8", kv_bits=4, nsamples=8, seqlen=64)
    out = convert(str(src), tmp_path / "out", opts, calib_tokens=calib_tokens(), progress=False)
    cfg = QuadConfig.load(out)
    tensors = load_tensors(out)
    schema = tensor_schema(cfg)
    assert set(tensors) == set(schema)
    for name, (shape, dtype) in schema.items():
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype, name
    # Every tensor name pattern in the schema appears in the format document's table, and vice versa.
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    patterns = {re.sub(r"^layers\.\d+\.", "layers.{i}.", n) for n in schema}
    patterns |= {re.sub(r"^layers\.\d+\.", "layers.{i}.", n).replace("qweight", "weight").replace("wscale", "weight")
                 for n in tensor_schema(QuadConfig(**{**cfg.__dict__, "mode": "w16a16"}))}
    assert patterns <= documented, patterns - documented
    log = json.loads((out / "conversion_log.json").read_text())
    assert len(log["relative_output_error"]) == cfg.num_layers
    for entry in log["relative_output_error"]:
        assert 0 < entry["qkv"] < 1 and 0 < entry["down"] < 1
    for f in ("tokenizer.json", "tokenizer_config.json", "quad_config.json", "model.safetensors"):
        assert (out / f).is_file(), f


def test_quantized_model_tracks_the_original(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", intermediate=96)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_model("llama", intermediate=96)(ids).logits
    errors = {}
    for mode, rank in (("w4a4a8", 8), ("w4a4", 8)):
        opts = ConvertOptions(rank=rank, mode=mode, nsamples=8, seqlen=64, act_clip=1.0)
        out = convert(str(src), tmp_path / f"{mode}", opts, calib_tokens=calib_tokens(), progress=False)
        with torch.no_grad():
            got = load_model(out)(ids)
        errors[mode] = float((got - expected).norm() / expected.norm())
    # 4-bit noise on a random tiny model is large, but the model must still be the same model,
    # and int8 inputs for o/down must not be worse than int4 ones.
    assert errors["w4a4a8"] < 0.5 and errors["w4a4"] < 0.6, errors
    assert errors["w4a4a8"] <= errors["w4a4"] * 1.05, errors
