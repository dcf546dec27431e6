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

from kernels_tl.gemm import _UNPACK_SRC, _decode_epilogue, _prefill_epilogue
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
                 block_k: int, where):
    """load(t): the producer's t-th TMA, of the output tile and K tile where(t) = (bx, by, kt), into
    its stage once the consumers have freed the stage; every producer thread then arrives on
    `loaded`."""

    @T.macro
    def load(t):
        st = t % stages
        tile_n, tile_m, k_tile = where(t)
        T.mbarrier_wait_parity(bars[X_FREE + st], (t // stages) % 2 ^ 1)
        T.tma_copy(XQ[tile_m * block_m:(tile_m + 1) * block_m, k_tile * block_k:(k_tile + 1) * block_k], x_s[st, :, :],
                   barrier=bars[LOADED + st])
        T.tma_copy(WQ[tile_n * block_n:(tile_n + 1) * block_n, k_tile * (block_k // 2):(k_tile + 1) * (block_k // 2)],
                   w_packed[st, :, :], barrier=bars[LOADED + st])
        T.mbarrier_arrive(bars[LOADED + st])

    return load


def _barrier_ids(stages: int, bufs: int) -> tuple[int, int, int, int]:
    """First index of loaded[stages], x_free[stages], unpacked[bufs], w_free[bufs] in the barrier array."""
    return 0, stages, 2 * stages, 2 * stages + bufs


def _barrier_counts(stages: int, bufs: int, consumers: int) -> list[int]:
    return [PRODUCER] * stages + [consumers] * stages + [PRODUCER] * bufs + [consumers] * bufs


def _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages: int, bufs: int, tiles, block_m: int, block_n: int,
              block_k: int, where, consumers: int):
    """The producer warpgroup's whole loop over its `tiles` K tiles (where(t) = (bx, by, kt) of the
    t-th; a persistent block's run through several output tiles is one such sequence): the TMA of
    the first stages - 1 tiles, then per tile t the TMA of tile t + stages - 2 (into the stage of
    tile t - 2, issued after tile t - 1's unpack so that its wait for the consumers to free that
    stage never delays the unpack they need next), the wait for tile t's bytes and for a free
    unpacked tile, the unpack, and the arrival on `unpacked`."""
    LOADED, X_FREE, UNPACKED, W_FREE = _barrier_ids(stages, bufs)
    load = _tile_loader(XQ, WQ, x_s, w_packed, bars, LOADED, X_FREE, stages, block_m, block_n, block_k, where)
    unpack = _producer_unpack(w_packed, w_s, block_n, block_k, consumers)
    static = isinstance(tiles, int)  # else a persistent block's count, which may be short (or 0)

    @T.macro
    def produce():
        T.set_max_nreg(PRODUCER_REGS, 0)
        for t in T.serial(stages - 1):
            if static:
                load(t)
            elif t < tiles:
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


def _consumer_loop(acc, x_s, w_s, bars, stages: int, bufs: int, tiles: int, weights_first: bool, policy, first=0):
    """The consumers' K loop over one output tile: per K tile wait for its bytes and its unpacked
    weights, multiply into acc (x_s · w_sᵀ, or w_s · x_sᵀ with weights_first), free the stage and
    the unpacked tile. `first`: the producer's count of the tile's first K tile (a persistent
    block's earlier output tiles), which the stage, buffer and barrier phases follow. (Keeping one
    tile's wgmma in flight instead, freeing a tile's buffers once the next tile's wgmma is issued,
    was measured 10-15% slower at 2048 / 8192 tokens, bench/results/gemm_ws_prefill_h200_2026-12-01.json.)"""
    LOADED, X_FREE, UNPACKED, W_FREE = _barrier_ids(stages, bufs)
    count = (lambda kt: kt) if isinstance(first, int) and first == 0 else (lambda kt: first + kt)

    @T.macro
    def consume():
        for kt in T.serial(tiles):
            s = count(kt) % stages
            u = count(kt) % bufs
            # The TMA bytes (already waited for by the producer, so this returns at once: the
            # wgmma's operands are then ordered after the copy engine's writes by the barrier that
            # carried them), then the unpacked weights.
            T.mbarrier_wait_parity(bars[LOADED + s], (count(kt) // stages) % 2)
            T.mbarrier_wait_parity(bars[UNPACKED + u], (count(kt) // bufs) % 2)
            if weights_first:
                T.gemm(w_s[u, :, :], x_s[s, :, :], acc, transpose_B=True, policy=policy)
            else:
                T.gemm(x_s[s, :, :], w_s[u, :, :], acc, transpose_B=True, policy=policy)
            T.mbarrier_arrive(bars[X_FREE + s])
            T.mbarrier_arrive(bars[W_FREE + u])

    return consume


def _persistent_tile(block, blocks: int, m_tiles, i):
    """(column tile, token tile) of a persistent block's i-th output tile: tiles `blocks` apart,
    column-major."""
    return (block + i * blocks) // m_tiles, (block + i * blocks) % m_tiles


def _persistent_where(block, blocks: int, m_tiles, tiles: int):
    """where(t) for the producer of a persistent block: (column tile, token tile, K tile) of its
    t-th K tile."""
    return lambda t: (*_persistent_tile(block, blocks, m_tiles, t // tiles), t % tiles)


@functools.lru_cache(maxsize=None)
def w4ax_gemm_ws(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                 block_m: int = 256, block_n: int = 128, block_k: int = 128, num_stages: int | None = None,
                 w_buffers: int = 2, blocks: int = 0, target=None):
    """kernel(x_q, x_scale, w_q, w_scale, x_out, w_out, bias, y) as `gemm.w4ax_gemm` (y written, not
    allocated; x_out / w_out / bias not read when rank == 0 / no bias). num_stages: TMA stages
    (default 4, 3 with the outlier path, whose operand tiles need the room).

    blocks > 0: the persistent form: `blocks` blocks (one a SM) walk the output tiles blocks apart,
    column-major (the tiles in flight at once share their weight columns and every block of tokens,
    which stay in L2). The producer's sequence of K tiles runs on from one output tile into the
    next, so while the consumers run a tile's epilogue it already loads and unpacks the next tile's
    first K tiles: the pipeline fills once a block, not once a tile (at K = 4096, 32 K tiles a tile,
    that fill and the epilogue are a fifth of a tile's time: o_proj 989 int8 TOPS against
    down_proj's 1278 at K = 14336). Same call and numerics."""
    assert k % block_k == 0 and rank % 16 == 0 and block_m % 128 == 0
    r = max(rank, 16)
    stages = num_stages or (3 if rank else 4)
    bufs = w_buffers
    tiles = k // block_k
    n_tiles = -(-n // block_n)
    assert tiles >= stages, "fewer K tiles than TMA stages"
    # The persistent form without shared-memory reuse: its liveness is per thread program, so it
    # lays the outlier tiles of the consumers' epilogue over the packed weight stages, which the
    # producer is already refilling for the next output tile (outlier products wrong from a block's
    # second tile on).
    pass_configs = {"tl.disable_shared_memory_reuse": True} if blocks else None

    @tilelang.jit(target=TARGETS[target], pass_configs=pass_configs)
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
            if blocks:
                with T.Kernel(blocks, threads=CONSUMERS + PRODUCER) as block:
                    x_s = T.alloc_shared((stages, block_m, block_k), "int8")
                    w_packed = T.alloc_shared((stages, block_n, block_k // 2), "uint8")
                    w_s = T.alloc_shared((bufs, block_n, block_k), "int8")
                    acc = T.alloc_fragment((block_m, block_n), "int32")
                    out = T.alloc_fragment((block_m, block_n), "float32")
                    bars = T.alloc_barrier(_barrier_counts(stages, bufs, CONSUMERS))
                    T.import_source(_UNPACK_SRC)
                    m_tiles = T.ceildiv(m, block_m)
                    # This block's output tiles: block, block + blocks, ... below m_tiles * n_tiles.
                    mine = T.if_then_else(block < m_tiles * n_tiles, T.ceildiv(m_tiles * n_tiles - block, blocks), 0)
                    produce = _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages, bufs, mine * tiles, block_m,
                                        block_n, block_k, _persistent_where(block, blocks, m_tiles, tiles), CONSUMERS)

                    with T.ws(2):
                        produce()

                    with T.ws(0, 1):
                        T.set_max_nreg(CONSUMER_REGS, 1)
                        # The tile's coordinates in registers, computed once a tile: as expressions
                        # the epilogue's bounds guards recomputed them at every element, 192 64-bit
                        # and 198 32-bit divisions by the dynamic token-tile count in the PTX of a tile.
                        bx = T.alloc_var("int32")
                        by = T.alloc_var("int32")
                        for i in T.serial(mine):
                            bx, by = _persistent_tile(block, blocks, m_tiles, i)
                            T.clear(acc)
                            _consumer_loop(acc, x_s, w_s, bars, stages, bufs, tiles, False, T.GemmWarpPolicy.FullRow,
                                           first=i * tiles)()
                            _prefill_epilogue(acc, out, XS, WS, XO, WO, BIAS, n, bx, by, rank, r, has_bias, block_m,
                                              block_n)
                            T.copy(out, Y[by * block_m, bx * block_n])
            else:
                with T.Kernel(n_tiles, T.ceildiv(m, block_m), threads=CONSUMERS + PRODUCER) as (bx, by):
                    x_s = T.alloc_shared((stages, block_m, block_k), "int8")
                    w_packed = T.alloc_shared((stages, block_n, block_k // 2), "uint8")
                    w_s = T.alloc_shared((bufs, block_n, block_k), "int8")
                    acc = T.alloc_fragment((block_m, block_n), "int32")
                    out = T.alloc_fragment((block_m, block_n), "float32")
                    bars = T.alloc_barrier(_barrier_counts(stages, bufs, CONSUMERS))
                    T.import_source(_UNPACK_SRC)

                    produce = _producer(XQ, WQ, x_s, w_packed, w_s, bars, stages, bufs, tiles, block_m, block_n,
                                        block_k, lambda t: (bx, by, t), CONSUMERS)
                    consume = _consumer_loop(acc, x_s, w_s, bars, stages, bufs, tiles, False,
                                             T.GemmWarpPolicy.FullRow)

                    with T.ws(2):
                        produce()

                    with T.ws(0, 1):
                        T.set_max_nreg(CONSUMER_REGS, 1)
                        T.clear(acc)
                        consume()
                        _prefill_epilogue(acc, out, XS, WS, XO, WO, BIAS, n, bx, by, rank, r, has_bias, block_m,
                                          block_n)
                        # Straight from registers: a staging tile would not fit beside the stages.
                        T.copy(out, Y[by * block_m, bx * block_n])

        return main

    return build()


DECODE_CONSUMERS = 128  # one consumer warpgroup: the [64, tokens] accumulator is small


@functools.lru_cache(maxsize=None)
def w4ax_gemm_decode_ws(n: int, k: int, rank: int, has_bias: bool = False, out_dtype: str = "float16",
                        block_m: int = 16, block_k: int = 256, num_stages: int = 3, w_buffers: int = 2,
                        target=None):
    """`gemm.w4ax_gemm_decode` (64 weight rows as the wgmma M side, the tokens as N, one block
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
                                    lambda t: (bx, by, t), DECODE_CONSUMERS)
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
