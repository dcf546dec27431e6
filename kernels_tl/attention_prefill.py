"""Causal prefill attention over the paged int4 KV cache (TileLang, Hopper): a packed batch of new
tokens attending to their sequences' cached prefixes and to themselves.

The engine stores a step's new K / V before attending, so every key a query needs is in the
cache: one kernel serves a chunked prefill and a sequence resumed with a cached prefix alike. A
prefill without any prefix attends to the K / V the store hands back (SDPA, see ops.paged_attention).

Flash attention with the decode kernel's tiling turned on its side: one program per (tile of new
tokens of one sequence, kv head); the program's 64 query rows are `64 // group` tokens times the
kv head's GQA group (row r = token r // group, head r % group), so each K / V tile is read and
dequantized once for the whole group. The program walks the sequence's cache blocks up to its last
query's position, dequantizes each 64-token tile to float16 in shared memory ((q - zero)·scale,
as the cache's reference), and keeps an online float32 softmax; the causal mask is aligned to the
end of the context (query i of n new tokens sits at position context - n + i).

Tiles come from `prefill_tiles` on the host (the query lengths are host data in the engine); the
token count, batch, tiles, number of cache blocks and table width are dynamic.
"""

import functools
import math

import tilelang
import tilelang.language as T

from kernels_tl.attention_tiles import attention_buffers, load_kv_block, prefetch_macros, softmax_pv
from kernels_tl.kv_attention import BLOCK_SIZE
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

ROWS = 64  # query rows of a program (tokens x GQA group), the mma tile height


def tokens_per_tile(heads: int, kv_heads: int, rows: int = ROWS) -> int:
    group = heads // kv_heads
    if group > rows:
        raise NotImplementedError(f"GQA group {group} larger than the {rows}-row tile")
    return rows // group


def prefill_tiles(query_lens, tokens: int):
    """int32 [tiles, 2] (sequence, first new token of the tile) covering every sequence's new
    tokens in tiles of `tokens` (query_lens: host ints or a CPU tensor)."""
    import torch

    tiles = [(i, t0) for i, n in enumerate(int(n) for n in query_lens) for t0 in range(0, n, tokens)]
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2)


@functools.lru_cache(maxsize=None)
def attention_prefill(heads: int, kv_heads: int, head_dim: int, block_size: int = BLOCK_SIZE,
                      sm_scale: float | None = None, threads: int = 128, target=None, num_stages: int = 1,
                      rows: int = ROWS, prefetch: bool = False):
    """Build (and cache) the kernel: kernel(q, k_data, k_meta, v_data, v_meta, block_tables,
    context_lens, query_starts, query_lens, tiles, out). q / out float16 [T, heads, head_dim] (the
    packed new tokens; out is written, not allocated), block_tables int32 [B, W], context_lens
    int32 [B] (cached tokens after this step, the new ones included), query_starts / query_lens
    int32 [B] (each sequence's new tokens are q[query_starts[i] : + query_lens[i]]), tiles int32
    [tiles, 2] from `prefill_tiles`.

    num_stages > 1: the cache blocks stream through TileLang's software pipeline (K / V tiles by
    the copy engine, warp-specialized), scale and zero read from global memory in the
    dequantization, as attention_decode's pipelined variant.

    rows (not yet measured on a GPU): query rows a program takes (64 or 128: with 128, each K / V
    tile is dequantized once for twice the queries; give it 256 threads, or the float32 output
    tile alone takes 128 registers a thread). prefetch (one stage; not yet measured on a GPU):
    attention_decode's register-prefetch loop, the next block's packed K / V in registers while
    the current one is multiplied, dequantized from registers (quad_kv_dequant8) instead of by
    one float32 expression per element from shared memory."""
    group = heads // kv_heads
    tokens = tokens_per_tile(heads, kv_heads, rows)
    used = tokens * group  # rows beyond are padding
    per_thread, prefetch_loop = prefetch_macros(threads, block_size, head_dim)
    assert not prefetch or (num_stages == 1 and threads % block_size == 0 and per_thread % 4 == 0)
    half = head_dim // 2
    scale_log2 = (sm_scale if sm_scale is not None else head_dim ** -0.5) * math.log2(math.e)

    @tilelang.jit(target=TARGETS[target])
    def build():
        t = T.dynamic("tokens")
        nb = T.dynamic("num_blocks")
        b = T.dynamic("batch")
        width = T.dynamic("table_width")
        nt = T.dynamic("tiles")

        @T.macro
        def scores_and_update(it, past, q0, q_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk):
            """Block `it` once K / V are in k_s / v_s: causal mask, online softmax, P·V."""
            T.clear(s)
            T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
            # Causal: key position <= the row's query position (every row keeps key 0, so
            # no row is all -inf).
            for r, j in T.Parallel(rows, block_size):
                s[r, j] = T.if_then_else(it * block_size + j <= past + q0 + r // group,
                                         s[r, j] * T.float32(scale_log2), -T.infinity("float32"))
            softmax_pv(s, m, m_prev, rescale, l, l_blk, o, p_s, v_s, rows, block_size, head_dim)

        @T.macro
        def one_block(it, seq, kvh, past, q0, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s,
                      p_s, o, m, m_prev, rescale, l, l_blk):
            """One cache block: dequantize K / V, causal mask, online softmax, P·V."""
            phys = TABLES[seq, it]
            load_kv_block(KD, KM, VD, VM, phys, kvh, kp_s, km_s, vp_s, vm_s, k_s, v_s, block_size, head_dim,
                           num_stages)
            scores_and_update(it, past, q0, q_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk)

        @T.prim_func
        def main(Q: T.Tensor((t, heads, head_dim), "float16"),
                 KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                 KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                 VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                 VM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                 TABLES: T.Tensor((b, width), "int32"), LENS: T.Tensor((b,), "int32"),
                 QSTART: T.Tensor((b,), "int32"), QLENS: T.Tensor((b,), "int32"),
                 TILES: T.Tensor((nt, 2), "int32"),
                 O: T.Tensor((t, heads, head_dim), "float16")):
            with T.Kernel(nt, kv_heads, threads=threads) as (tile, kvh):
                (q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l,
                 l_blk) = attention_buffers(rows, block_size, head_dim)

                seq = TILES[tile, 0]
                q0 = TILES[tile, 1]
                qlen = QLENS[seq]
                base = QSTART[seq]
                past = LENS[seq] - qlen                      # tokens cached before this step
                last = past + T.min(q0 + tokens, qlen) - 1   # position of the tile's last query
                n_blocks = last // block_size + 1

                for r, d in T.Parallel(rows, head_dim):
                    q_s[r, d] = T.if_then_else(r < used and q0 + r // group < qlen,
                                               Q[base + q0 + r // group, kvh * group + r % group, d], T.float16(0))
                T.fill(o, 0)
                T.fill(l, 0)
                T.fill(m, -T.infinity("float32"))
                if prefetch:
                    prefetch_loop(n_blocks, lambda it: TABLES[seq, it], kvh, KD, KM, VD, VM, k_s, v_s,
                                  lambda it: scores_and_update(it, past, q0, q_s, k_s, v_s, s, p_s, o, m, m_prev,
                                                               rescale, l, l_blk))
                elif num_stages == 1:
                    for it in T.serial(n_blocks):
                        one_block(it, seq, kvh, past, q0, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk)
                else:
                    for it in T.Pipelined(n_blocks, num_stages=num_stages):
                        one_block(it, seq, kvh, past, q0, KD, KM, VD, VM, TABLES, q_s, kp_s, vp_s, km_s, vm_s, k_s, v_s, s, p_s, o, m, m_prev, rescale, l, l_blk)
                for r, d in T.Parallel(rows, head_dim):
                    if r < used and q0 + r // group < qlen:
                        O[base + q0 + r // group, kvh * group + r % group, d] = T.Cast("float16", o[r, d] / l[r])

        return main

    return build()


def attention_prefill_op(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, query_lens,
                         sm_scale: float | None = None, num_stages: int = 1, rows: int = ROWS, prefetch: bool = False,
                         threads: int | None = None):
    """float16 [T, heads, head_dim] causal attention of the packed new tokens q [T, heads, head_dim]
    over the paged cache (which already holds them); query_lens on the host. rows / prefetch /
    threads: attention_prefill's variants (threads default: 128, 256 for 128 rows)."""
    import torch

    heads, head_dim, kv_heads = q.shape[1], q.shape[2], k_data.shape[1]
    lens = [int(n) for n in query_lens]
    tiles = prefill_tiles(lens, tokens_per_tile(heads, kv_heads, rows)).to(q.device, non_blocking=True)
    starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int32).to(q.device, non_blocking=True)
    qlens = torch.tensor(lens, dtype=torch.int32).to(q.device, non_blocking=True)
    out = torch.empty_like(q, dtype=torch.float16)
    threads = threads or (256 if rows > 64 else 128)
    kernel = attention_prefill(heads, kv_heads, head_dim, k_data.shape[2], sm_scale, threads, None, num_stages, rows,
                               prefetch)
    kernel(q.half().contiguous(), k_data, k_meta, v_data, v_meta, block_tables.int(), context_lens.int(), starts, qlens,
           tiles, out)
    return out


def attention_prefill_sdpa_op(q, k_data, k_meta, v_data, v_meta, block_tables, context_lens, query_lens,
                              sm_scale: float | None = None):
    """attention_prefill_op's result through flash attention: each sequence's cache (the cached
    prefix and the new tokens, which the cache already holds) gathered and dequantized to float16
    (kernels_tl.kv_dequant), then SDPA with the causal mask aligned to the bottom right (a chunk's
    query i sees the prefix and the chunk up to i), GQA in the attention kernel. The int4 cache is
    read once per sequence instead of once per 64-query tile. float32 on the CPU.

    context_lens and query_lens are host lengths (lists or CPU tensors): the gathers are sized by
    them, and reading them from the GPU would stall the stream in every layer."""
    import torch
    from torch.nn.attention.bias import causal_lower_right

    from kernels_tl.kv_dequant import gather_dequant

    dtype = torch.float16 if q.is_cuda else torch.float32
    lens, ctx = [int(n) for n in query_lens], [int(c) for c in context_lens]
    out, start = [], 0
    for i, n in enumerate(lens):
        k, v = (gather_dequant(data, meta, block_tables[i], ctx[i]).to(dtype).unsqueeze(0)
                for data, meta in ((k_data, k_meta), (v_data, v_meta)))
        # [1, heads, n, head_dim] over q's [n, heads, head_dim] memory: the layout flash attention
        # works in, so neither q nor the output is copied.
        qi = q[start:start + n].transpose(0, 1).unsqueeze(0).to(dtype)
        mask = causal_lower_right(n, ctx[i]) if n != ctx[i] else None
        o = torch.nn.functional.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=mask is None,
                                                             scale=sm_scale, enable_gqa=True)
        out.append(o[0].transpose(0, 1))
        start += n
    return (out[0] if len(out) == 1 else torch.cat(out)).half()
