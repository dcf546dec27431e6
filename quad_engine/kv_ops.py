"""The paged KV cache's side of the dispatch layer (`quad_engine.ops` holds the rest): storing a
step's new K / V (int4, or float16 for the unquantized baseline), the fused RoPE + head Hadamard +
store, and attention over the paged cache, each with one signature for both backends: the
TileLang kernels (`kernels_tl.kv_store`, `kernels_tl.rope_kv_store`, `kernels_tl.kv_attention`,
`kernels_tl.attention_prefill`) on CUDA tensors, the PyTorch reference on the CPU.
"""

from __future__ import annotations

import os

import torch

from kernels_tl import reference as ref
from quad_engine.context import get_context
from quad_engine.ops import _profiled, use_kernels

def _kv_kernels_support(cache: tuple) -> bool:
    """The KV kernels' shapes: head_dim a multiple of 64, 64-token blocks."""
    return cache[0].shape[-1] * 2 % 64 == 0 and cache[0].shape[2] == 64


@_profiled("kv_store")
def kv_store(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, cache: tuple, clip: float,
             round_trip: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Quantize the new tokens' K and V [T, kv_heads, head_dim] into their cache slots. With
    round_trip, return them as the cache now holds them (dequantized: float16 from the kernel,
    which rounds there anyway; float32 on the reference path), for a prefill that attends to its
    own tokens without reading the cache back."""
    k, v = k.half(), v.half()  # the cache quantizes float16 K / V
    if use_kernels(k) and _kv_kernels_support(cache):
        from kernels_tl.kv_store import kv_store_op
        return kv_store_op(k, v, slot_mapping, *cache, clip=clip, round_trip=round_trip)
    ref.kv_store(k.float(), v.float(), slot_mapping, *cache, clip=clip)
    if round_trip:
        return ref.fake_quant_kv(k.float(), 4, clip), ref.fake_quant_kv(v.float(), 4, clip)
    return None


def fused_rope_store_enabled() -> bool:
    """Engine steps run RoPE, the head Hadamard and the int4 KV store as one kernel
    (kernels_tl.rope_kv_store); QUAD_FUSED_ROPE=0 runs the same rotation elementwise in torch and
    the separate store (the reference's composition)."""
    return os.environ.get("QUAD_FUSED_ROPE", "1") != "0"


def fused_rope_store_supports(cfg, qkv: torch.Tensor, cache: tuple | None) -> bool:
    """Whether an engine step's attention can take the fused RoPE + Hadamard + store kernel: the
    kernels in use, a quantized model with the int4 cache, head_dim 64 or 128, and a head Hadamard
    that is one Sylvester matrix of order head_dim (or none)."""
    spec = cfg.hadamard_head
    sylvester = spec is None or (list(spec.factors) == [cfg.head_dim] and spec.block in (None, cfg.head_dim))
    return (fused_rope_store_enabled() and cfg.quantized and cache is not None and cfg.head_dim in (64, 128)
            and sylvester and use_kernels(qkv) and _kv_kernels_support(cache))


@_profiled("kv_store")
def rope_kv_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor, cache: tuple,
                  cfg, round_trip: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(q [T, heads, head_dim] rotated, the round trip's (k, v) or None) for the qkv GEMM's output
    [T, (heads + 2·kv_heads)·head_dim]: Q and K get RoPE and the head Hadamard, K and V go into
    their cache slots (see kv_store for round_trip)."""
    from kernels_tl.rope_kv_store import rope_kv_store_op
    out = rope_kv_store_op(qkv, cos, sin, slot_mapping, *cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           clip=cfg.kv_clip, hadamard=cfg.hadamard_head is not None, round_trip=round_trip)
    return (out[0], (out[1], out[2])) if round_trip else (out, None)


@_profiled("attention")
def paged_attention(q: torch.Tensor, cache: tuple, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_lens: torch.Tensor, is_prefill: bool,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    has_prefix: bool | None = None, host_context_lens: list[int] | None = None) -> torch.Tensor:
    """Causal attention of the packed new queries [T, heads, head_dim] over the paged cache (which
    already holds the new tokens). Decode on CUDA runs the split-KV kernel. A prefill whose
    sequences have no cached prefix attends to its own new K / V through SDPA: new_kv [T,
    kv_heads, head_dim] each, after the cache's int4 round trip (kv_store(round_trip=True)), the
    same values the cache holds, without gathering them back. A prefill with a cached prefix (a
    chunk of a long prompt) runs flash attention over its dequantized cache on CUDA, sized by
    host_context_lens (context_lens on the host), or the paged prefill kernel
    (prefix_attention_sdpa). Anything else runs the reference."""
    q = q.half()
    if not is_prefill and use_kernels(q) and _kv_kernels_support(cache):
        from kernels_tl.kv_attention import attention_decode_op, decode_splits
        # Splits from the table's capacity, not this step's lengths: a captured graph and an eager
        # step of the same bucket then sum in the same order and give the same tokens.
        splits = decode_splits(q.shape[0], cache[0].shape[1], cache[0].shape[2] * block_tables.shape[1])
        return attention_decode_op(q.contiguous(), *cache, block_tables, context_lens, splits)
    if is_prefill and new_kv is not None and not _has_prefix(has_prefix, query_lens, context_lens):
        ctx = get_context()
        if ctx is not None and ctx.attention_break is not None:
            return ctx.attention_break(q, *new_kv)
        return attend_new_tokens(q, *new_kv, query_lens)
    if is_prefill and use_kernels(q) and _kv_kernels_support(cache):
        if prefix_attention_sdpa():
            from kernels_tl.attention_prefill import attention_prefill_sdpa_op
            host = host_context_lens if host_context_lens is not None else context_lens.tolist()
            return attention_prefill_sdpa_op(q, *cache, block_tables, host, query_lens.tolist())
        from kernels_tl.attention_prefill import attention_prefill_op
        return attention_prefill_op(q.contiguous(), *cache, block_tables, context_lens, query_lens.tolist())
    return ref.paged_attention(q.float(), *cache, block_tables.cpu(), context_lens.cpu(), query_lens.cpu()).half()


def prefix_attention_sdpa() -> bool:
    """A prefill with a cached prefix gathers and dequantizes each sequence's cache to float16 and
    runs flash attention on it (attention_prefill_sdpa_op): 3.1-3.9x faster than the paged int4
    prefill kernel at 8k tokens, which dequantizes the prefix again for every 64-query tile
    (bench/results/attention_prefill_h200_2026-12-01.json). QUAD_PREFILL_ATTENTION=kernel runs
    that kernel instead."""
    return os.environ.get("QUAD_PREFILL_ATTENTION", "sdpa") != "kernel"


def _has_prefix(known: bool | None, query_lens: torch.Tensor, context_lens: torch.Tensor) -> bool:
    """Whether some sequence attends to tokens cached before this step. The engine knows it on the
    host (StepContext.has_prefix); comparing the lengths would wait for the GPU in every layer."""
    if known is not None:
        return known
    return not torch.equal(query_lens.cpu(), context_lens.cpu().long())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The quantized model's causal self-attention, [B, heads, T, head_dim] (GQA), float16 out.
    float16 Q (the decode kernel's input); on a GPU everything runs in float16 (flash attention),
    on the CPU in float32 on the same Q and the given K / V."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q.is_cuda:
        return sdpa(q.half(), k.half(), v.half(), is_causal=True, enable_gqa=True)
    return sdpa(q.half().float(), k.float(), v.float(), is_causal=True, enable_gqa=True).half()


def _float_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fp16 baseline's: float16 on a GPU (flash attention), q's float dtype on the CPU."""
    dtype = torch.float16 if q.is_cuda and q.dtype != torch.bfloat16 else q.dtype
    return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True,
                                                            enable_gqa=True)


def attend_new_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized model's prefill attention without a cached prefix: each packed sequence over its
    own new tokens (after the cache's int4 round trip), [T, heads, head_dim] float16; into the first
    rows of `out` when given (the prefill graphs' static buffer)."""
    return _attend_new_tokens(q, k, v, query_lens, causal_attention, out)


def _attend_new_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: torch.Tensor,
                       attend=_float_attention, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens, [T, heads, head_dim]: one copy
    of each sequence's [heads, n, head_dim] result into the token-major output."""
    parts, start = [], 0
    for n in query_lens.tolist():
        qi, ki, vi = (x[start:start + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        parts.append((start, n, attend(qi, ki, vi)[0].transpose(0, 1)))
        start += n
    if out is None:
        # One sequence: flash attention's output is token-major already ([B, n, heads, hd] in
        # memory), so the transpose back is contiguous and no copy is made (a 2048-token prompt's
        # copy was 7 µs a layer).
        return parts[0][2].contiguous() if len(parts) == 1 else torch.cat([part for _, _, part in parts])
    for first, n, part in parts:
        out[first:first + n].copy_(part)
    return out[:start]  # start: the token count by now


@_profiled("kv_store")
def kv_store_fp16(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, cache: tuple) -> None:
    """The unquantized baseline's float16 paged cache (k_cache, v_cache). Padding rows (slot -1)
    write the pool's spare last block, which no sequence owns: no boolean indexing, so the step
    has no host synchronization and can be captured in a CUDA graph."""
    k_cache, v_cache = cache
    block_size = k_cache.shape[2]
    slots = torch.where(slot_mapping >= 0, slot_mapping.long(), (k_cache.shape[0] - 1) * block_size)
    k_cache[slots // block_size, :, slots % block_size] = k.to(k_cache.dtype)
    v_cache[slots // block_size, :, slots % block_size] = v.to(v_cache.dtype)


@_profiled("attention")
def paged_attention_fp16(q: torch.Tensor, cache: tuple, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         query_lens: torch.Tensor, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None, has_prefix: bool | None = None) -> torch.Tensor:
    if k_new is not None and not _has_prefix(has_prefix, query_lens, context_lens):
        return _attend_new_tokens(q, k_new, v_new, query_lens)  # a prefill without cached prefix
    if k_new is None:  # decode: one batched SDPA call, no host synchronization (CUDA-graph safe)
        return _decode_attention_fp16(q, *cache, block_tables, context_lens)
    return ref.paged_attention_fp16(q, *cache, block_tables.cpu(), context_lens.cpu(), query_lens.cpu())


def _decode_attention_fp16(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its gathered blocks, positions past its length masked out."""
    batch, width = block_tables.shape
    kv_heads, block_size, dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    k = k_cache[block_tables.long()].transpose(1, 2).reshape(batch, kv_heads, width * block_size, dim)
    v = v_cache[block_tables.long()].transpose(1, 2).reshape(batch, kv_heads, width * block_size, dim)
    mask = torch.arange(width * block_size, device=q.device) < context_lens.to(q.device).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2).to(k.dtype), k, v,
                                                           attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out.squeeze(2)
