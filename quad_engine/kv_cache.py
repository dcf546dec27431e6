"""Allocation and sizing of the paged int4 KV cache (layout: docs/kv-cache-format.md).

One pool for all layers, with per-layer views handed to the attention modules; the block manager
hands out block ids into it and never sees the tensors.
"""

from __future__ import annotations

import torch

from quad_engine.config import QuadConfig

BLOCK_SIZE = 64  # tokens per block: the decode attention kernel's tile


def bytes_per_block(cfg: QuadConfig, block_size: int = BLOCK_SIZE) -> int:
    """Packed nibbles plus float16 (scale, zero) per token and head, K and V, all layers; float16
    values for the unquantized baseline (kv_bits 16)."""
    if isinstance(cfg, QuadConfig):
        per_token_head = cfg.head_dim // 2 + 2 * 2
    else:
        per_token_head = cfg.head_dim * cfg.dtype.itemsize
    return cfg.num_layers * 2 * cfg.num_kv_heads * block_size * per_token_head


def blocks_for_budget(cfg: QuadConfig, budget_bytes: int, block_size: int = BLOCK_SIZE) -> int:
    return max(0, budget_bytes // bytes_per_block(cfg, block_size))


def gpu_budget(device: torch.device, utilization: float) -> int:
    """Bytes left for the cache when the process may use `utilization` of the GPU, measured after the
    model is loaded and a warm-up step has run (its activations set the peak)."""
    free, total = torch.cuda.mem_get_info(device)
    in_use_by_others = total - free - torch.cuda.memory_reserved(device)
    return int(total * utilization - in_use_by_others - torch.cuda.max_memory_allocated(device))


def allocate(cfg: QuadConfig, num_blocks: int, device, block_size: int = BLOCK_SIZE) -> list[tuple]:
    """Per layer (k_data, k_meta, v_data, v_meta), views into two pool tensors; (k, v) float16 for
    the unquantized baseline."""
    shape = (cfg.num_layers, 2, num_blocks, cfg.num_kv_heads, block_size)
    if not isinstance(cfg, QuadConfig):  # the unquantized baseline (models/fp16.py)
        # One spare block past the managed ones: padding rows of a graphed batch write there
        # (kv_ops.kv_store_fp16), so the store needs no boolean indexing.
        shape = (cfg.num_layers, 2, num_blocks + 1, cfg.num_kv_heads, block_size)
        pool = torch.zeros(*shape, cfg.head_dim, dtype=cfg.dtype, device=device)
        return [(pool[i, 0], pool[i, 1]) for i in range(cfg.num_layers)]
    if cfg.kv_bits != 4:
        raise NotImplementedError(f"the engine's paged cache for QUAD checkpoints is int4; this one has "
                                  f"kv_bits={cfg.kv_bits}")
    data = torch.zeros(*shape, cfg.head_dim // 2, dtype=torch.uint8, device=device)
    meta = torch.zeros(*shape, 2, dtype=torch.float16, device=device)
    return [(data[i, 0], meta[i, 0], data[i, 1], meta[i, 1]) for i in range(cfg.num_layers)]
