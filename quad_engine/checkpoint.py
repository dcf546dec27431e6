"""Packed checkpoint: the tensor table (the format, as code), loading and validation.

`docs/checkpoint-format.md` describes the same table for readers; `tensor_schema` is what the loader
enforces and what the tests compare a converted checkpoint against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from quad_engine.config import QuadConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config; str() is one line."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def tensor_schema(cfg: QuadConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a checkpoint of this config holds: name -> (shape, dtype)."""
    fp = _dtype(cfg.dtype)
    d, r, D = cfg.hidden_size, cfg.rank, cfg.width
    hd = cfg.head_dim
    n_qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    n_attn = cfg.num_heads * hd
    ffn = cfg.intermediate_size
    schema: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "embed.weight": ((cfg.vocab_size, D), fp),
        "lm_head.weight": ((cfg.vocab_size, D), fp),
        "rope.inv_freq": ((hd // 2,), torch.float32),
    }
    # (name, out_features, quantized in_features, has fp16 outlier slice, has bias)
    linears = [("qkv", n_qkv, d, True, cfg.attention_bias), ("o", D, n_attn, False, False),
               ("gate_up", 2 * ffn, d, True, False), ("down", D, ffn, False, False)]
    for i in range(cfg.num_layers):
        for name, n, k, outlier, bias in linears:
            p = f"layers.{i}.{name}."
            if cfg.quantized:
                groups = 1 if cfg.group_size == -1 else k // cfg.group_size
                schema[p + "qweight"] = ((n, k // 2), torch.uint8)
                schema[p + "wscale"] = ((n, groups), torch.float16)
            else:
                schema[p + "weight"] = ((n, k), fp)
            if outlier and r > 0:
                schema[p + "w_out"] = ((n, r), fp)
            if bias:
                schema[p + "bias"] = ((n,), fp)
    return schema


def shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / SINGLE_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory} has no {SINGLE_NAME} or {INDEX_NAME}")


def load_tensors(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in shard_files(directory):
        if not path.is_file():
            raise CheckpointError(f"shard {path.name} listed in {INDEX_NAME} is missing")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def validate_tensors(cfg: QuadConfig, tensors: dict[str, torch.Tensor]) -> None:
    schema = tensor_schema(cfg)
    missing = sorted(set(schema) - set(tensors))
    extra = sorted(set(tensors) - set(schema))
    if missing or extra:
        raise CheckpointError(f"checkpoint tensors do not match quad_config.json: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                              f"{'...' if len(extra) > 3 else ''}")
    for name, (shape, dtype) in schema.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"{name}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}")


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Load a packed checkpoint into the reference-backend model (see quad_engine.models.llama)."""
    from quad_engine.models.llama import QuadForCausalLM

    cfg = QuadConfig.load(directory)
    tensors = load_tensors(directory, device)
    validate_tensors(cfg, tensors)
    model = QuadForCausalLM(cfg, tensors).eval()
    return model
