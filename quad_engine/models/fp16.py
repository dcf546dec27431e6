"""The unquantized baseline: a Hugging Face Llama / Qwen2 checkpoint run by the same engine.

Same interface as the QUAD model (`hidden`, `logits`, `layers[i].attn.kv_cache`), with plain
float16 GEMMs (cuBLAS) and a paged float16 KV cache, so the bench compares the two paths under
one scheduler, one sampler and the same step metadata. The weights are loaded by transformers
(HF directory, .gguf file or hub id) and re-used, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quad_engine import kv_ops
from quad_engine.context import get_context
from quad_engine.models.llama import apply_rope, rope_cos_sin, rope_table


@dataclass
class FP16Config:
    """The few shapes the engine needs, read from the transformers config."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_attention_scaling: float
    dtype: torch.dtype
    kv_bits: int = 16


class FP16Attention(nn.Module):
    def __init__(self, cfg: FP16Config, hf_attn):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj
        self.kv_cache: tuple | None = None  # (k, v) float16 [num_blocks, kv_heads, block_size, head_dim]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
        ctx = get_context()
        if ctx is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k_new, v_new = k[0].transpose(0, 1), v[0].transpose(0, 1)
            kv_ops.kv_store_fp16(k_new, v_new, ctx.slot_mapping, self.kv_cache)
            new = (k_new, v_new) if ctx.is_prefill else (None, None)
            attn = kv_ops.paged_attention_fp16(q[0].transpose(0, 1), self.kv_cache, ctx.block_tables,
                                            ctx.context_lens, ctx.query_lens, *new,
                                            has_prefix=ctx.has_prefix).transpose(0, 1).unsqueeze(0)
        return self.o(attn.transpose(1, 2).reshape(b, t, -1).to(x.dtype))


class FP16Layer(nn.Module):
    def __init__(self, cfg: FP16Config, hf_layer):
        super().__init__()
        self.attn = FP16Attention(cfg, hf_layer.self_attn)
        self.mlp = hf_layer.mlp
        self.ln1, self.ln2 = hf_layer.input_layernorm, hf_layer.post_attention_layernorm

    def forward(self, h, cos, sin):
        h = h + self.attn(self.ln1(h), cos, sin)
        return h + self.mlp(self.ln2(h))


class FP16ForCausalLM(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        c = hf_model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rotary = hf_model.model.rotary_emb
        self.cfg = FP16Config(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim,
                              c.hidden_size, c.rms_norm_eps, c.max_position_embeddings,
                              float(rotary.attention_scaling), next(hf_model.parameters()).dtype)
        self.embed, self.norm, self.lm_head = hf_model.model.embed_tokens, hf_model.model.norm, hf_model.lm_head
        self.register_buffer("inv_freq", rotary.inv_freq.float().clone(), persistent=False)
        self.rope_rows: torch.Tensor | None = None  # see precompute_rope
        self.layers = nn.ModuleList(FP16Layer(self.cfg, layer) for layer in hf_model.model.layers)

    def precompute_rope(self, max_len: int) -> None:
        """Engine steps (positions below max_len) then gather cos / sin, already in the model's dtype."""
        self.rope_rows = rope_table(self.inv_freq, max_len, self.cfg.rope_attention_scaling, self.cfg.dtype)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.residual(input_ids, positions)[0])

    def residual(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(h, None): the residual stream after the last layer (QuadForCausalLM.residual's form)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        h = self.embed(input_ids)
        if self.rope_rows is not None and get_context() is not None:
            cos, sin = self.rope_rows[:, positions]
        else:
            cos, sin = rope_cos_sin(self.inv_freq, positions, self.cfg.rope_attention_scaling)
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h, None

    def head_logits(self, h: torch.Tensor, pending: None = None) -> torch.Tensor:
        return self.logits(self.norm(h))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(input_ids))


def load_fp16_model(source: str | Path, device: torch.device):
    """(model, tokenizer) for an HF directory, a .gguf file or a hub id; float16 on a GPU, float32
    on the CPU (where float16 matmuls are slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    kw, where = ({"gguf_file": path.name}, str(path.parent)) if path.suffix == ".gguf" else ({}, str(source))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).to(device).eval()
    return FP16ForCausalLM(hf).eval(), AutoTokenizer.from_pretrained(where, **kw)
