"""Paged int4 KV cache store (TileLang, Hopper): quantize a step's new K / V and scatter them into
their cache slots (layout: docs/kv-cache-format.md, `kv_attention.py`'s docstring and
`reference.kv_store`)."""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.kv_attention import BLOCK_SIZE
from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401


def quantize_store_row(per_lane: int, block_size: int, clip: float, round_trip: bool):
    """The store's quantization of one (token, K or V, head) row held by a warp, as a macro shared by
    `kv_store` and `rope_kv_store`: x [per_lane] float32 (this lane's consecutive values), stat [4]
    scratch (lo, hi, scale, zero); min / max by warp shuffles, the float16 scale, codes packed two
    a byte into (blk, off) of KD / VD with scale and zero into KM / VM when slot >= 0, and with
    round_trip the dequantized values into KO / VO."""

    @T.macro
    def store_row(x, stat, slot, blk, off, is_k, h, tok, lane, KD, KM, VD, VM, KO, VO):
        stat[0] = x[0]
        stat[1] = x[0]
        for i in T.unroll(1, per_lane):
            stat[0] = T.min(stat[0], x[i])
            stat[1] = T.max(stat[1], x[i])
        stat[0] = T.min(T.warp_reduce_min(stat[0]), T.float32(0)) * T.float32(clip)
        stat[1] = T.max(T.warp_reduce_max(stat[1]), T.float32(0)) * T.float32(clip)
        # The stored scale is float16: quantize with exactly that value.
        stat[2] = T.Cast("float32", T.Cast("float16", (stat[1] - stat[0]) / T.float32(15)))
        stat[2] = T.if_then_else(stat[2] == T.float32(0), T.float32(1), stat[2])
        stat[3] = T.clamp(T.round(-stat[0] / stat[2]), T.float32(0), T.float32(15))
        for j in T.unroll(per_lane // 2):
            q0 = T.clamp(T.round(x[2 * j] / stat[2]) + stat[3], T.float32(0), T.float32(15))
            q1 = T.clamp(T.round(x[2 * j + 1] / stat[2]) + stat[3], T.float32(0), T.float32(15))
            byte = T.Cast("uint8", q0) | (T.Cast("uint8", q1) << T.uint8(4))
            if round_trip:
                col = lane * per_lane + 2 * j
                d0 = T.Cast("float16", (q0 - stat[3]) * stat[2])
                d1 = T.Cast("float16", (q1 - stat[3]) * stat[2])
                if is_k:
                    KO[tok, h, col] = d0
                    KO[tok, h, col + 1] = d1
                else:
                    VO[tok, h, col] = d0
                    VO[tok, h, col + 1] = d1
            if slot >= 0:
                if is_k:
                    KD[blk, h, off, lane * (per_lane // 2) + j] = byte
                else:
                    VD[blk, h, off, lane * (per_lane // 2) + j] = byte
        if lane < 2 and slot >= 0:
            value = T.Cast("float16", T.if_then_else(lane == 0, stat[2], stat[3]))
            if is_k:
                KM[blk, h, off, lane] = value
            else:
                VM[blk, h, off, lane] = value

    return store_row


@functools.lru_cache(maxsize=None)
def kv_store(kv_heads: int, head_dim: int, block_size: int = BLOCK_SIZE, clip: float = 1.0, target=None,
             round_trip: bool = False):
    """Quantize new K and V [T, kv_heads, head_dim] (float16) and scatter them into the cache;
    called as kernel(k, v, slot_mapping, k_data, k_meta, v_data, v_meta). Slot -1 is skipped.
    Matches `reference.kv_store` bit for bit (IEEE division, round-half-even, float16 scale).
    One warp per (token, K or V, head): min / max by warp shuffles, each lane packs its bytes.

    round_trip: two more outputs, k_out and v_out float16 [T, kv_heads, head_dim] (every token,
    slot -1 included): the values the cache now holds, dequantized ((q - zero)·scale in float32,
    as `reference.dequantize_kv`, rounded to float16). A prefill without a cached prefix attends
    to those directly instead of reading the cache back."""
    assert head_dim % 64 == 0
    per_lane = head_dim // 32
    half = head_dim // 2

    @tilelang.jit(target=TARGETS[target])
    def build():
        t = T.dynamic("tokens")
        nb = T.dynamic("num_blocks")

        store_row = quantize_store_row(per_lane, block_size, clip, round_trip)

        @T.macro
        def body(K, V, SLOTS, KD, KM, VD, VM, KO, VO, tok, row):
            lane = T.get_thread_binding()
            x = T.alloc_local((per_lane,), "float32")
            stat = T.alloc_local((4,), "float32")  # lo, hi, scale, zero
            slot = SLOTS[tok]
            is_k = row < kv_heads
            h = row % kv_heads
            if round_trip or slot >= 0:
                blk, off = slot // block_size, slot % block_size
                for i in T.unroll(per_lane):
                    x[i] = T.Cast("float32", T.if_then_else(is_k, K[tok, h, lane * per_lane + i],
                                                            V[tok, h, lane * per_lane + i]))
                store_row(x, stat, slot, blk, off, is_k, h, tok, lane, KD, KM, VD, VM, KO, VO)

        if round_trip:
            @T.prim_func
            def main(K: T.Tensor((t, kv_heads, head_dim), "float16"), V: T.Tensor((t, kv_heads, head_dim), "float16"),
                     SLOTS: T.Tensor((t,), "int32"),
                     KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     VM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     KO: T.Tensor((t, kv_heads, head_dim), "float16"),
                     VO: T.Tensor((t, kv_heads, head_dim), "float16")):
                with T.Kernel(t, 2 * kv_heads, threads=32) as (tok, row):
                    wait_for_producers("kv_store")
                    body(K, V, SLOTS, KD, KM, VD, VM, KO, VO, tok, row)
        else:
            @T.prim_func
            def main(K: T.Tensor((t, kv_heads, head_dim), "float16"), V: T.Tensor((t, kv_heads, head_dim), "float16"),
                     SLOTS: T.Tensor((t,), "int32"),
                     KD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     KM: T.Tensor((nb, kv_heads, block_size, 2), "float16"),
                     VD: T.Tensor((nb, kv_heads, block_size, half), "uint8"),
                     VM: T.Tensor((nb, kv_heads, block_size, 2), "float16")):
                with T.Kernel(t, 2 * kv_heads, threads=32) as (tok, row):
                    wait_for_producers("kv_store")
                    body(K, V, SLOTS, KD, KM, VD, VM, K, V, tok, row)  # K, V: never written without round_trip

        return main

    return build()


def kv_store_op(k, v, slot_mapping, k_data, k_meta, v_data, v_meta, clip: float = 1.0, round_trip: bool = False):
    """Store the new tokens' K / V; with round_trip, also return (k, v) as the cache holds them,
    dequantized to float16 [T, kv_heads, head_dim]."""
    import torch

    kv_heads, head_dim = k.shape[1], k.shape[2]
    kernel = kv_store(kv_heads, head_dim, k_data.shape[2], float(clip), round_trip=round_trip)
    args = (k.half().contiguous(), v.half().contiguous(), slot_mapping.int(), k_data, k_meta, v_data, v_meta)
    if not round_trip:
        kernel(*args)
        return None
    k_out, v_out = torch.empty_like(args[0]), torch.empty_like(args[1])
    kernel(*args, k_out, v_out)
    return k_out, v_out
