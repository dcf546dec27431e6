"""W4A4 / W4A8 GEMMs with the int4 unpack in a producer warpgroup (TileLang, Hopper): the prefill
kernel (`w4ax_gemm_ws`) and the fused decode kernel (`w4ax_gemm_decode_ws`).

Same contracts and numerics as their counterparts in `kernels_tl.gemm` (the integer part exact, the
same epilogues). There, TileLang's automatic warp specialization gives the copies to a producer
warpgroup and leaves the unpack of each packed weight tile to the consumer warpgroups: every K tile
they unpack (shared to shared), meet at a barrier, multiply, wait for the tensor cores and meet
again, so the tensor cores idle through the unpack (Nsight Compute, gate_up at 2048 tokens: 988
int8 TOPS, 80% of cycles with no eligible warp; at 32 tokens: 1.57 TB/s, 87%). Here the warp roles
are written out. The producer warpgroup keeps the copy engine up to `num_stages - 1` K tiles ahead
(activation and packed weight tiles by TMA) and, one tile at a time, waits for a tile's bytes,
unpacks its weights into one of `w_buffers` int8 tiles and signals the consumers, then issues the
next tile's TMA; the consumers only wait, multiply and free what they read. Tile k + 1's unpack then
runs while the tensor cores work on tile k. The unpacked tiles are twice the size of the packed
ones, so there are fewer of them than TMA stages.

Barriers: per TMA stage s `loaded[s]` (the producer's 128 threads arrive, plus the TMA bytes) and
`x_free[s]` (every consumer thread arrives once its wgmma on the stage completed); per unpacked
tile u `unpacked[u]` (the producer arrives after the unpack and an async-proxy fence) and
`w_free[u]`. The packed tile of a stage is read by the producer alone, before it reloads that stage.
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.gemm import _UNPACK_SRC, _prefill_epilogue
from kernels_tl.gemm_decode import _decode_epilogue
from kernels_tl.pdl import wait_for_producers
from kernels_tl.targets import SM90, TARGETS  # noqa: F401

CONSUMERS = 256   # two consumer warpgroups, block_m / 2 tokens each
PRODUCER = 128
# Registers a thread (setmaxnreg): the consumers hold the [block_m, block_n] int32 accumulator and
# the float32 epilogue tile; the producer's unpack needs a 16-byte load and two 16-byte stores.
CONSUMER_REGS, PRODUCER_REGS = 232, 40


def _producer_unpack(wp_s, w_s, rows: int, block_k: int, consumers: int = CONSUMERS):
    """The producer warpgroup's unpack of stage s into unpacked tile u: [rows, block_k / 2] packed ->
    [rows, block_k] int8 holding 16·q (gemm._UNPACK_SRC), 16 packed bytes an item, then the fence
    that orders these generic-proxy stores before the consumers' wgmma reads (async proxy)."""
    chunks = block_k // 32
    items = rows * chunks

    @T.macro
    def unpack(s, u):
        tx = T.get_thread_binding() - consumers
        for it in T.serial(-(-items // PRODUCER)):
            item = it * PRODUCER + tx
            row, col = item // chunks, item % chunks
            if items % PRODUCER == 0 or item < items:
                T.call_extern("handle", "quad_unpack_int4x32", T.address_of(wp_s[s, row, col * 16]),
                              T.address_of(w_s[u, row, col * 32]), T.address_of(w_s[u, row, col * 32 + 16]))
        T.fence_proxy_async()

    return unpack


def _tile_loader(XQ, WQ, x_s, w_packed, bars, LOADED: int, X_FREE: int, stages: int, block_m: int, block_n: int,
                 block_k: int, bx, by):
    """load(k_tile): the producer's TMA of this block's K tile k_tile into its stage, once the
    consumers have freed the stage; every producer thread then arrives on `loaded`."""

    @T.macro
    def load(k_tile):
        st = k_tile % stages
        T.mbarrier_wait_parity(bars[X_FREE + st], (k_tile // stages) % 2 ^ 1)
        T.tma_copy(XQ[by * block_m:(by + 1) * block_m, k_tile * block_k:(k_tile + 1) * block_k], x_s[st, :, :],
                   barrier=bars[LOADED + st])
        T.tma_copy(WQ[bx * block_n:(bx + 1) * block_n, k_tile * (block_k // 2):(k_tile + 1) * (block_k // 2)],
                   w_packed[st, :, :], barrier=bars[LOADED + st])
        T.mbarrier_arrive(bars[LOADED + st])

    return load


def _barrier_ids(stages: int, bufs: int) -> tuple[int, int, int, int]:
    """First index of loaded[stages], x_free[stages], unpacked[bufs], w_free[bufs] in the barrier array."""
    return 0, stages, 2 * stages, 2 * stages + bufs


def _barrier_counts(stages: int, bufs: int, consumers: int) -> list[int]:
    return [PRODUCER] * stages + [consumers] * stages + [PRODUCER] * bufs + [consumers] * bufs


def _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages: int, bufs: int, tiles: int, block_m: int, block_n: int,
              block_k: int, bx, by, consumers: int):
    """The producer warpgroup's whole loop: the TMA of the first stages - 1 tiles, then per tile
    kt the TMA of tile kt + stages - 2 (into the stage of tile kt - 2, issued after tile kt - 1's
    unpack so that its wait for the consumers to free that stage never delays the unpack they
    need next), the wait for tile kt's bytes and for a free unpacked tile, the unpack, and the
    arrival on `unpacked`."""
    LOADED, X_FREE, UNPACKED, W_FREE = _barrier_ids(stages, bufs)
    load = _tile_loader(XQ, WQ, x_s, w_packed, bars, LOADED, X_FREE, stages, block_m, block_n, block_k, bx, by)
    unpack = _producer_unpack(w_packed, w_s, block_n, block_k, consumers)

    @T.macro
    def produce():
        T.set_max_nreg(PRODUCER_REGS, 0)
        for t in T.serial(stages - 1):
            load(t)
        for kt in T.serial(tiles):
            if kt >= 1 and kt + stages - 2 < tiles:
                load(kt + stages - 2)
            s = kt % stages
            u = kt % bufs
            T.mbarrier_wait_parity(bars[LOADED + s], (kt // stages) % 2)
            T.mbarrier_wait_parity(bars[W_FREE + u], (kt // bufs) % 2 ^ 1)
            unpack(s, u)
            T.mbarrier_arrive(bars[UNPACKED + u])

    return produce


def _consumer_loop(acc, x_s, w_s, bars, stages: int, bufs: int, tiles: int, weights_first: bool, policy):
    """The consumers' K loop: per tile wait for its bytes and its unpacked weights, multiply into acc
    (x_s · w_sᵀ, or w_s · x_sᵀ with weights_first), free the stage and the unpacked tile. (Keeping
    one tile's wgmma in flight instead, freeing a tile's buffers once the next tile's wgmma is
    issued, was measured 10-15% slower at 2048 / 8192 tokens, bench/results/gemm_ws_prefill_h200_2026-12-01.json.)"""
    LOADED, X_FREE, UNPACKED, W_FREE = _barrier_ids(stages, bufs)

    @T.macro
    def consume():
        for kt in T.serial(tiles):
            s = kt % stages
            u = kt % bufs
            # The TMA bytes (already waited for by the producer, so this returns at once: the
            # wgmma's operands are then ordered after the copy engine's writes by the barrier that
            # carried them), then the unpacked weights.
            T.mbarrier_wait_parity(bars[LOADED + s], (kt // stages) % 2)
            T.mbarrier_wait_parity(bars[UNPACKED + u], (kt // bufs) % 2)
            if weights_first:
                T.gemm(w_s[u, :, :], x_s[s, :, :], acc, transpose_B=True, policy=policy)
            else:
                T.gemm(x_s[s, :, :], w_s[u, :, :], acc, transpose_B=True, policy=policy)
            T.mbarrier_arrive(bars[X_FREE + s])
            T.mbarrier_arrive(bars[W_FREE + u])

    return consume


@functools.lru_cache(maxsize=None)
def w4ax_gemm_ws(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                 block_m: int = 256, block_n: int = 128, block_k: int = 128, num_stages: int | None = None,
                 w_buffers: int = 2, target=None):
    """kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y) as `gemm.w4ax_gemm` (y written, not
    allocated; x_out / w_out / bias not read when rank == 0 / no bias). num_stages: TMA stages
    (default 4, 3 with the outlier path, whose operand tiles need the room)."""
    assert k % block_k == 0 and rank % 16 == 0 and block_m % 128 == 0
    r = max(rank, 16)
    stages = num_stages or (3 if rank else 4)
    bufs = w_buffers
    tiles = k // block_k
    assert tiles >= stages, "fewer K tiles than TMA stages"

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            XQ: T.Tensor((m, k), "int8"),
            XS: T.Tensor((m,), "float32"),
            WQ: T.Tensor((n, k // 2), "uint8"),
            WS: T.Tensor((n,), "float16"),
            XO: T.Tensor((m, r), "float16"),
            WO: T.Tensor((n, r), "float16"),
            BIAS: T.Tensor((n,), "float16"),
            Y: T.Tensor((m, n), out_dtype),
        ):
            with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(m, block_m), threads=CONSUMERS + PRODUCER) as (bx, by):
                x_s = T.alloc_shared((stages, block_m, block_k), "int8")
                w_packed = T.alloc_shared((stages, block_n, block_k // 2), "uint8")
                w_s = T.alloc_shared((bufs, block_n, block_k), "int8")
                acc = T.alloc_fragment((block_m, block_n), "int32")
                out = T.alloc_fragment((block_m, block_n), "float32")
                bars = T.alloc_barrier(_barrier_counts(stages, bufs, CONSUMERS))
                T.import_source(_UNPACK_SRC)

                produce = _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages, bufs, tiles, block_m, block_n, block_k,
                                    bx, by, CONSUMERS)
                consume = _consumer_loop(acc, x_s, w_s, bars, stages, bufs, tiles, False,
                                         T.GemmWarpPolicy.FullRow)

                with T.ws(2):
                    produce()

                with T.ws(0, 1):
                    T.set_max_nreg(CONSUMER_REGS, 1)
                    T.clear(acc)
                    consume()
                    _prefill_epilogue(acc, out, XS, WS, XO, WO, BIAS, n, bx, by, rank, r, has_bias, block_m, block_n)
                    # Straight from registers: a staging tile would not fit beside the stages.
                    T.copy(out, Y[by * block_m, bx * block_n])

        return main

    return build()


DECODE_CONSUMERS = 128  # one consumer warpgroup: the [64, tokens] accumulator is small


@functools.lru_cache(maxsize=None)
def w4ax_gemm_decode_ws(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                        block_m: int = 16, block_k: int = 256, num_stages: int = 3, w_buffers: int = 2,
                        target=None):
    """`gemm_decode.w4ax_gemm_decode` (64 weight rows as the wgmma M side, the tokens as N, one block
    covering K, the epilogue fused) with the warp roles of `w4ax_gemm_ws`: a producer warpgroup that
    brings the tiles by TMA and unpacks the weights, one consumer warpgroup that multiplies and
    runs the epilogue. There the consumers unpack between two barriers and the next K tile waits
    for it (Nsight Compute, gate_up at 32 tokens: one block a SM, 87% of cycles with no eligible
    warp); here the unpack of tile k + 1 overlaps tile k's wgmma, and the default tiles (256-wide
    K, three stages, two unpacked tiles: ~100 KB) let two blocks share a SM so that one's ramp and
    epilogue overlap the other's weight stream. Called like the prefill kernel."""
    block_n = 64
    assert k % block_k == 0 and n % block_n == 0 and rank % 16 == 0
    r = max(rank, 16)
    stages, bufs, tiles = num_stages, w_buffers, k // block_k
    assert tiles >= stages, "fewer K tiles than TMA stages"

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            XQ: T.Tensor((m, k), "int8"),
            XS: T.Tensor((m,), "float32"),
            WQ: T.Tensor((n, k // 2), "uint8"),
            WS: T.Tensor((n,), "float16"),
            XO: T.Tensor((m, r), "float16"),
            WO: T.Tensor((n, r), "float16"),
            BIAS: T.Tensor((n,), "float16"),
            Y: T.Tensor((m, n), out_dtype),
        ):
            with T.Kernel(n // block_n, T.ceildiv(m, block_m), threads=DECODE_CONSUMERS + PRODUCER) as (bx, by):
                T.annotate_min_blocks_per_sm(2)
                wait_for_producers("gemm")
                x_s = T.alloc_shared((stages, block_m, block_k), "int8")
                w_packed = T.alloc_shared((stages, block_n, block_k // 2), "uint8")
                w_s = T.alloc_shared((bufs, block_n, block_k), "int8")
                acc = T.alloc_fragment((block_n, block_m), "int32")
                out = T.alloc_fragment((block_n, block_m), "float32")
                out_s = T.alloc_shared((block_n, block_m), "float32")
                bars = T.alloc_barrier(_barrier_counts(stages, bufs, DECODE_CONSUMERS))
                T.import_source(_UNPACK_SRC)
                produce = _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages, bufs, tiles, block_m, block_n, block_k,
                                    bx, by, DECODE_CONSUMERS)
                consume = _consumer_loop(acc, x_s, w_s, bars, stages, bufs, tiles, True,
                                         T.GemmWarpPolicy.Square)

                with T.ws(1):
                    produce()

                with T.ws(0):
                    T.clear(acc)
                    consume()
                    _decode_epilogue(acc, out, out_s, XS, WS, XO, WO, BIAS, Y, m, bx, by, rank, r, has_bias,
                                     out_dtype, block_n, block_m, 1.0 / 16)

        return main

    return build()
