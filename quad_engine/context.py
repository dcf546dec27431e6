"""Per-step metadata of the paged KV cache, in one small object the attention layers read.

The engine sets it before a forward pass and clears it after, so the model's forward stays
(input_ids, positions) and a captured CUDA graph sees fixed tensors whose contents change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor    # int32 [T]: cache slot of every new token (-1: padding, not stored)
    block_tables: torch.Tensor    # int32 [B, W]: physical blocks of each sequence
    context_lens: torch.Tensor    # int32 [B]: tokens in the cache after this step, per sequence
    query_lens: torch.Tensor      # int64 [B] (CPU): new tokens per sequence (1 each when decoding)
    has_prefix: bool = False      # some sequence already has tokens in the cache (chunked / resumed prefill)
    host_context_lens: list[int] | None = None  # context_lens on the host (prefills): sizes the prefix gathers
    # Capturing a prefill's piecewise CUDA graphs (quad_engine.prefill_graphs): called as
    # attention_break(q, k_new, v_new) in place of a prefill's attention over its own tokens.
    attention_break: Callable | None = None


_context: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _context
    _context = ctx


def get_context() -> StepContext | None:
    return _context
