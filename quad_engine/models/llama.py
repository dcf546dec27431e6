"""QUAD Llama / Qwen2 decoder, as the packed checkpoint stores it.

The residual stream is r + d wide: r fp16 outlier channels first, then the d channels that are
quantized. Norms are weightless (their weights are fused into the next linears), the embedding and
every linear that reads or writes the stream are already rotated, and the inverse of each online
Hadamard is fused into the weight that consumes it. So the forward pass is the original model's
forward with three extra steps: split at the norm, online Hadamards, quantization.

Llama and Qwen2 differ only in q/k/v bias, which the checkpoint carries or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard
from quad_engine import kv_ops, ops
from quad_engine.config import QuadConfig
from quad_engine.context import get_context


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE; x [B, heads, T, hd], cos/sin [B or 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [.., T, hd] for integer positions, HF's layout (frequencies repeated twice)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rope_table(inv_freq: torch.Tensor, max_len: int, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[2, max_len, hd]: cos and sin of every position below max_len, rope_cos_sin's values (each
    element comes from the same elementwise operations). An engine step gathers its rows with one
    kernel instead of computing them with seven (a few µs of a batch-1 decode step)."""
    cos, sin = rope_cos_sin(inv_freq, torch.arange(max_len, device=inv_freq.device), scale)
    return torch.stack((cos, sin)).to(dtype)


def rope_hadamard_matrices(cos: torch.Tensor, sin: torch.Tensor, spec, chunk: int = 1024) -> torch.Tensor:
    """Per-token matrices M [B, T, hd, hd] with x @ M = hadamard(apply_rope(x)) for a row x of one
    head at that token: (x·cos + rotate_half(x)·sin) @ H = x @ (diag(cos) H + P diag(sin) H), P the
    rotate-half permutation. Built once per forward and shared by every layer, they turn RoPE and
    the head Hadamard of Q and K into one batched matmul per layer instead of a dozen elementwise
    kernels (the unquantized mode's float32 path). Computed `chunk` tokens at a time."""
    hd = cos.shape[-1]
    eye = torch.eye(hd, device=cos.device, dtype=torch.float32)
    h = eye if spec is None else apply_hadamard(eye, spec.factors, spec.block)
    half = hd // 2
    # rotate_half(x)_j = -x_(j+half) for j < half, x_(j-half) above; cos and sin repeat with period
    # half, so P diag(sin) H = diag(sin) [H_(half:) ; -H_(:half)].
    rot_h = torch.cat((h[half:], -h[:half]), dim=0)
    out = torch.empty(*cos.shape, hd, device=cos.device, dtype=torch.float32)
    for start in range(0, cos.shape[-2], chunk):
        c, s = cos[..., start:start + chunk, :], sin[..., start:start + chunk, :]
        out[..., start:start + chunk, :, :] = c.unsqueeze(-1) * h + s.unsqueeze(-1) * rot_h
    return out


class Attention(nn.Module):
    def __init__(self, cfg: QuadConfig, tensors: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.cfg = cfg
        self.qkv = ops.QuantWeights.from_checkpoint(tensors, prefix + "qkv.")
        self.o = ops.QuantWeights.from_checkpoint(tensors, prefix + "o.")
        self.kv_cache: tuple | None = None  # (k_data, k_meta, v_data, v_meta), set by the engine

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                rope_h: torch.Tensor | None = None) -> torch.Tensor:
        """The attention branch's output for residual h, after h += pending (fused into the norm)."""
        cfg, bits = self.cfg, self.cfg.act_bits
        b, t, _ = h.shape
        x_out, x_q, x_s = ops.rmsnorm_quant(h, cfg.rank, cfg.hidden_size, cfg.rms_norm_eps,
                                            bits["qkv"], cfg.act_clip, residual=pending, prefetch=self.qkv)
        qkv = self.qkv(x_q, x_s, x_out)
        ops.l2_prefetch(self.o, "o", b * t)  # under RoPE, the KV store and attention (decode steps)
        nq, nkv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        ctx = get_context()
        if ctx is not None and kv_ops.fused_rope_store_supports(cfg, qkv, self.kv_cache):
            # Engine step, one kernel from the GEMM's output: RoPE and the head Hadamard of Q and K,
            # K and V into the int4 cache.
            q, new_kv = kv_ops.rope_kv_store(qkv[0], cos, sin, ctx.slot_mapping, self.kv_cache, cfg,
                                          round_trip=ctx.is_prefill and not ctx.has_prefix)
            attn = kv_ops.paged_attention(q, self.kv_cache, ctx.block_tables, ctx.context_lens, ctx.query_lens,
                                       ctx.is_prefill, new_kv, ctx.has_prefix, ctx.host_context_lens)
            return self.o(*ops.hadamard_quant(attn.reshape(b, t, nq), cfg.hadamard_o, bits["o"], cfg.act_clip),
                          into_residual=True)
        v = qkv[..., nq + nkv:].view(b, t, cfg.num_kv_heads, hd).transpose(1, 2)
        # The head_dim Hadamard after RoPE spreads K's outliers so its int4 cache quantizes well;
        # Q gets the same one so QKᵀ is unchanged. V's was fused into v_proj offline.
        if rope_h is not None:  # both in one matmul with the per-token matrices
            qk = ops.rope_hadamard(qkv[..., :nq + nkv].view(b, t, cfg.num_heads + cfg.num_kv_heads, hd), rope_h)
            q, k = qk[:, :, :cfg.num_heads].transpose(1, 2), qk[:, :, cfg.num_heads:].transpose(1, 2)
        else:
            q = qkv[..., :nq].view(b, t, cfg.num_heads, hd).transpose(1, 2)
            k = qkv[..., nq:nq + nkv].view(b, t, cfg.num_kv_heads, hd).transpose(1, 2)
            q = ops.hadamard(apply_rope(q, cos, sin), cfg.hadamard_head)
            k = ops.hadamard(apply_rope(k, cos, sin), cfg.hadamard_head)
            if cfg.quantized:  # the exact rotation rounded once to float16, as the fused kernel does
                q, k = q.half(), k.half()
        if ctx is None:  # full recompute: the cache's int4 round trip is simulated
            if cfg.quantized:  # the engine's numerics: float16 K / V into the cache, float16 attention
                k = ref.fake_quant_kv(k.half().float(), cfg.kv_bits, cfg.kv_clip)
                v = ref.fake_quant_kv(v.half().float(), cfg.kv_bits, cfg.kv_clip)
                attn = kv_ops.causal_attention(q, k, v)
            else:  # the float32 invariance check of the rotations
                attn = F.scaled_dot_product_attention(q, k.float(), v.float(), is_causal=True, enable_gqa=True)
            attn = attn.transpose(1, 2).reshape(b, t, nq)
        else:  # engine step: the batch is packed into t tokens (b == 1)
            # A prefill with no cached prefix attends to its own K / V as the cache holds them,
            # which the store hands back (no gather from the cache).
            new_kv = kv_ops.kv_store(k[0].transpose(0, 1), v[0].transpose(0, 1), ctx.slot_mapping, self.kv_cache,
                                  cfg.kv_clip, round_trip=ctx.is_prefill and not ctx.has_prefix)
            attn = kv_ops.paged_attention(q[0].transpose(0, 1), self.kv_cache, ctx.block_tables, ctx.context_lens,
                                       ctx.query_lens, ctx.is_prefill, new_kv, ctx.has_prefix,
                                       ctx.host_context_lens)
            attn = attn.reshape(b, t, nq)
        a_q, a_s = ops.hadamard_quant(attn, cfg.hadamard_o, bits["o"], cfg.act_clip)
        return self.o(a_q, a_s, into_residual=True)


class MLP(nn.Module):
    def __init__(self, cfg: QuadConfig, tensors: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.cfg = cfg
        self.gate_up = ops.QuantWeights.from_checkpoint(tensors, prefix + "gate_up.")
        self.down = ops.QuantWeights.from_checkpoint(tensors, prefix + "down.")

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The MLP branch's output for residual h, after h += pending (fused into the norm)."""
        cfg, bits = self.cfg, self.cfg.act_bits
        x_out, x_q, x_s = ops.rmsnorm_quant(h, cfg.rank, cfg.hidden_size, cfg.rms_norm_eps,
                                            bits["gate_up"], cfg.act_clip, residual=pending, prefetch=self.gate_up)
        act = ops.gate_up_swiglu(x_q, x_s, self.gate_up, x_out)  # the GEMM's epilogue, where it can
        if act is not None:
            a_q, a_s = ops.hadamard_quant(act, cfg.hadamard_down, bits["down"], cfg.act_clip)
        else:
            gate_up = self.gate_up(x_q, x_s, x_out)
            ops.l2_prefetch(self.down, "down", gate_up.numel() // gate_up.shape[-1])  # under the quantizer
            a_q, a_s = ops.swiglu_hadamard_quant(gate_up, cfg.hadamard_down, bits["down"], cfg.act_clip)
        return self.down(a_q, a_s, into_residual=True)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QuadConfig, tensors: dict[str, torch.Tensor], index: int):
        super().__init__()
        self.attn = Attention(cfg, tensors, f"layers.{index}.")
        self.mlp = MLP(cfg, tensors, f"layers.{index}.")

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                rope_h: torch.Tensor | None = None) -> torch.Tensor:
        """Advance the float32 residual h in place; returns this layer's MLP output, which the next
        norm adds (each residual add rides in the following norm kernel's pass over the row; on the
        GPU a split-K down_proj's sums, whose epilogue rides there too: ops.materialize)."""
        attn = self.attn(h, pending, cos, sin, rope_h)
        return self.mlp(h, attn)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layer as a function of its input residual (a new tensor; h is left as it was)."""
        h = h.float().clone()
        return h + ops.materialize(self(h, None, cos, sin))


class QuadForCausalLM(nn.Module):
    """Reference-backend model: forward(input_ids [B, T]) -> float32 logits [B, T, V]."""

    # Unquantized mode: steps up to this many tokens take RoPE + head Hadamard as per-token float32
    # matrices (64 KB a token at head_dim 128); longer steps use the elementwise form.
    ROPE_MATRIX_MAX_TOKENS = 512

    def __init__(self, cfg: QuadConfig, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("embed", tensors["embed.weight"])
        self.register_buffer("lm_head", tensors["lm_head.weight"])
        self.head_int8 = False  # see use_int8_head
        self.register_buffer("inv_freq", tensors["rope.inv_freq"].float())
        self.rope_rows: torch.Tensor | None = None  # see precompute_rope
        self.layers = nn.ModuleList(DecoderLayer(cfg, tensors, i) for i in range(cfg.num_layers))

    def precompute_rope(self, max_len: int) -> None:
        """Engine steps (positions below max_len, which the scheduler enforces) then gather cos / sin."""
        self.rope_rows = rope_table(self.inv_freq, max_len, self.cfg.rope_attention_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], recomputing every position (no cache)."""
        return self.head_logits(*self.residual(input_ids, positions))

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalized hidden states (float32, r + d wide)."""
        h, pending = self.residual(input_ids, positions)
        if pending is not None:
            h += pending  # a tensor: residual() materializes it
        return ref.rmsnorm_widened(h, self.cfg.hidden_size, self.cfg.rms_norm_eps)

    def residual(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, pending): the float32 residual stream after the last layer but for that layer's MLP
        output (pending, float16), which the final norm adds (head_logits). With an engine
        StepContext set, input_ids / positions are one packed step [1, T] and attention goes
        through the paged KV cache."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        if self.rope_rows is not None and get_context() is not None:
            cos, sin = self.rope_rows[:, positions]
        else:
            cos, sin = rope_cos_sin(self.inv_freq, positions, self.cfg.rope_attention_scaling)
        # The quantized models' Q / K: RoPE and the head Hadamard in float32, rounded once to
        # float16 (on a GPU engine step, the fused kernel kernels_tl.rope_kv_store; elsewhere
        # elementwise, Attention.forward). The unquantized mode takes them as per-token matrices,
        # built once here for every layer (ops.rope_hadamard).
        rope_h = None
        if not self.cfg.quantized and input_ids.numel() <= self.ROPE_MATRIX_MAX_TOKENS:
            rope_h = rope_hadamard_matrices(cos, sin, self.cfg.hadamard_head)
        if self.head_int8:  # int8 rows times their scales (type promotion: one kernel, no float copy)
            h = self.embed[input_ids] * self.embed_scale[input_ids].unsqueeze(-1)
        else:
            h = self.embed[input_ids].float()  # a fresh tensor (indexing copies): updated in place below
        pending = None
        for layer in self.layers:
            pending = layer(h, pending, cos, sin, rope_h)
        return h, ops.materialize(pending)  # a tensor for the caller (the engine takes rows of it)

    def head_logits(self, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """float32 logits [.., V] of residual rows (residual's output, h updated in place). With
        the int8 head the final norm, the pending add and the head's int8 quantization are one
        rmsnorm_quant pass (its float16 boundaries: the norm reads float16(h), x_out leaves as
        float16), so a decode step's tail is two kernels instead of a dozen small ones."""
        if self.head_int8:
            return ops.head_logits_int8(h, pending, self.cfg, self.head_out, self.head_q, self.head_scale)
        if pending is not None:
            h += pending
        return self.logits(ref.rmsnorm_widened(h, self.cfg.hidden_size, self.cfg.rms_norm_eps))

    @torch.no_grad()
    def use_int8_head(self) -> None:
        """Keep the embedding and lm_head tables as int8 rows with per-row scales instead of float16
        (Llama-3-8B: 2.1 GB -> 1.05 GB, 0.5 GB less to read every decode step), the lm_head run as
        the layers' GEMMs are (ops.head_logits_int8: its r outlier input channels against float16
        weights). No measurable perplexity cost on SmolLM2 (scripts/smollm2_head_int8.py: 28.86 ->
        28.81)."""
        if self.head_int8:
            return
        r = self.cfg.rank
        embed_q, embed_s = ref.quantize_rows_int8(self.embed)
        head_q, head_s = ref.quantize_rows_int8(self.lm_head[:, r:])
        head_out = self.lm_head[:, :r].half().contiguous()
        self.embed, self.lm_head = embed_q, None  # the float16 tables are freed
        self.register_buffer("embed_scale", embed_s)
        self.register_buffer("head_q", head_q)
        self.register_buffer("head_scale", head_s)
        self.register_buffer("head_out", head_out)
        self.head_int8 = True

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [.., V] of normalized hidden states through the float16 head (the int8
        head takes the residual: head_logits). On a GPU a float16 tensor-core GEMM: a float32 copy
        of a 128k-row head would cost more than the rest of a decode step (and gigabytes inside a
        CUDA graph)."""
        if self.head_int8:
            raise RuntimeError("the int8 head reads the residual: call head_logits")
        if hidden.is_cuda:
            return F.linear(hidden.to(self.lm_head.dtype), self.lm_head).float()
        return hidden @ self.lm_head.float().T
