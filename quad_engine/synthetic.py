"""Random-weight QUAD models of named architectures, packed exactly as the converter packs them.

Speed does not depend on the weights' values, so the bench and the GPU tests measure real shapes
(Llama-3-8B, Qwen2.5-7B, Llama-2-13B, SmolLM2) where no checkpoint can be downloaded: every tensor of
`checkpoint.tensor_schema` is generated on the target device with the converter's dtypes, layouts and
plausible magnitudes (int4 codes uniform in [-7, 7], scales that give unit-variance outputs).
"""

from __future__ import annotations

import torch

from kernels_tl.hadamard import block_hadamard_size, hadamard_factors
from quad_engine.checkpoint import tensor_schema
from quad_engine.config import HadamardSpec, QuadConfig

ARCHITECTURES = {
    "llama-3-8b": dict(architecture="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, attention_bias=False, rope_theta=500000.0),
    "qwen2.5-7b": dict(architecture="qwen2", hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, attention_bias=True, rope_theta=1000000.0),
    "llama-2-13b": dict(architecture="llama", hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                        head_dim=128, intermediate_size=13824, vocab_size=32000, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, attention_bias=False, rope_theta=10000.0),
    "smollm2-135m": dict(architecture="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, attention_bias=False, rope_theta=100000.0),
}


def _online(n: int) -> HadamardSpec:
    """The converter's online Hadamard for size n (exact, or its recorded block-diagonal fallback)."""
    factors = hadamard_factors(n)
    if factors is not None:
        return HadamardSpec(size=n, factors=factors)
    block = block_hadamard_size(n)
    return HadamardSpec(size=n, factors=hadamard_factors(block), block=block)


def synthetic_config(name: str, num_layers: int | None = None, mode: str = "w4a4", rank: int = 64,
                     kv_bits: int = 4, **overrides) -> QuadConfig:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    shapes = dict(ARCHITECTURES[name], **overrides)
    shapes.pop("rope_theta")
    if num_layers is not None:
        shapes["num_layers"] = num_layers
    hd, nh = shapes["head_dim"], shapes["num_heads"]
    return QuadConfig(**shapes, rank=rank, rope_attention_scaling=1.0, mode=mode, kv_bits=kv_bits,
                      hadamard_head=_online(hd), hadamard_o=_online(nh * hd),
                      hadamard_down=_online(shapes["intermediate_size"]),
                      source={"description": f"synthetic {name}", "architecture": name})


def synthetic_tensors(cfg: QuadConfig, device="cpu", seed: int = 0, rope_theta: float | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint schema, random, on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    theta = rope_theta or ARCHITECTURES.get(cfg.source.get("architecture", ""), {}).get("rope_theta", 10000.0)
    tensors, schema = {}, tensor_schema(cfg)
    for name, (shape, dtype) in schema.items():
        if name == "rope.inv_freq":
            t = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim)
        elif name.endswith("qweight"):
            # Two int4 codes per byte, uniform in [-7, 7] like GPTQ's symmetric grid. Mean zero
            # matters: codes in [-8, 7] (mean -0.5) give every weight matrix a strong rank-one
            # component that amplifies rounding differences several-fold per layer.
            lo, hi = (torch.randint(-7, 8, shape, generator=g, device=device, dtype=torch.int16) & 0xF
                      for _ in range(2))
            t = (lo | (hi << 4)).to(torch.uint8)
        elif name.endswith("wscale"):   # codes uniform in [-7, 7] have std sqrt(56 / 3): unit-variance outputs
            k = 2 * schema[name.replace("wscale", "qweight")][0][1]
            t = torch.full(shape, 1.0 / ((56 / 3) * k) ** 0.5, device=device, dtype=dtype)
        elif name.endswith("bias"):
            t = (0.02 * torch.randn(shape, generator=g, device=device)).to(dtype)
        elif name.endswith("w_out"):
            t = (torch.randn(shape, generator=g, device=device) / cfg.hidden_size ** 0.5).to(dtype)
        elif name == "lm_head.weight":
            t = (torch.randn(shape, generator=g, device=device) / cfg.width ** 0.5).to(dtype)
        else:  # embedding
            t = torch.randn(shape, generator=g, device=device).to(dtype)
        tensors[name] = t
    return tensors


def synthetic_model(name: str, device="cpu", seed: int = 0, **config_kw):
    """A QuadForCausalLM of a named architecture with random packed weights."""
    from quad_engine.models.llama import QuadForCausalLM

    cfg = synthetic_config(name, **config_kw)
    return QuadForCausalLM(cfg, synthetic_tensors(cfg, device, seed)).eval()
