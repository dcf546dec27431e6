"""Gather a sequence's cache blocks and dequantize them to float16 (TileLang): the K / V of a
chunked prefill's cached prefix, for flash attention (`attention_prefill.attention_prefill_sdpa_op`).

Layout in: the paged int4 cache (`reference.py`, docs/kv-cache-format.md). Layout out: float16
[kv_heads, blocks · block_size, head_dim], SDPA's [heads, tokens, head_dim] for one sequence.
Numerics: `reference.gather_kv` rounded once to float16, (nibble - zero) · scale in float32.
Memory bound: one program per (block, kv head) reads the block's packed rows and their (scale,
zero) once.
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401



@functools.lru_cache(maxsize=None)
def kv_gather_dequant(kv_heads: int, head_dim: int, block_size: int = 64, threads: int = 128, target=None):
    """kernel(data uint8 [num_blocks, kv_heads, block_size, head_dim / 2], meta float16 [num_blocks,
    kv_heads, block_size, 2], blocks int32 [n], out float16 [kv_heads, n · block_size, head_dim]):
    out[h, i · block_size + t] = the dequantized row t of cache block blocks[i], head h."""
    half = head_dim // 2

    # Block ids come from block tables (valid by construction): no per-element bounds checks.
    @tilelang.jit(target=TARGETS[target], pass_configs={"tl.disable_safe_memory_legalize": True})
    def build():
        nb = T.dynamic("num_blocks")
        n = T.dynamic("n")

        @T.prim_func
        def main(DATA: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                 META: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                 BLOCKS: T.Tensor((n,), "int32"),
                 OUT: T.Tensor((kv_heads, n * block_size, head_dim), "float16")):
            with T.Kernel(n, kv_heads, threads=threads) as (i, h):
                wait_for_producers("attention")
                blk = BLOCKS[i]
                # One output element a lane, its nibble picked by the parity of d: the stores
                # vectorize (a half2 a lane) where two writes a byte stayed scalar.
                for t, d in T.Parallel(block_size, head_dim):
                    nibble = (DATA[blk, h, t, d // 2] >> T.Cast("uint8", (d % 2) * 4)) & T.uint8(15)
                    scale = T.Cast("float32", META[blk, h, t, 0])
                    zero = T.Cast("float32", META[blk, h, t, 1])
                    OUT[h, i * block_size + t, d] = T.Cast("float16", (T.Cast("float32", nibble) - zero) * scale)

        return main

    return build()


def gather_dequant(data, meta, block_table, length: int):
    """float16 [kv_heads, length, head_dim]: the first `length` tokens of one sequence's cache
    (its block table row), dequantized; the kernel on CUDA, `reference.gather_kv` elsewhere."""
    import torch

    block_size = data.shape[2]
    blocks = block_table[: -(-length // block_size)]
    if not data.is_cuda:
        from kernels_tl import reference as ref
        return ref.gather_kv(data, meta, blocks, length).half().transpose(0, 1)
    out = torch.empty(data.shape[1], blocks.shape[0] * block_size, data.shape[3] * 2, dtype=torch.float16,
                      device=data.device)
    kv_gather_dequant(data.shape[1], data.shape[3] * 2, block_size)(data, meta, blocks.int().contiguous(), out)
    return out[:, :length]
