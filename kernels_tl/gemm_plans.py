"""Tile plans of the W4A4 / W4A8 GEMM kernels: the measured constants and the functions that pick,
from a problem's shape alone, the tiles, K tiles, pipeline stages, K splits and blocks a SM of the
kernel `gemm_dispatch` runs there (so one compiled kernel serves every token count of a class).
Each constant's comment says what it was measured against.
"""

import os

LONG_TILES = dict(block_m=384, block_n=128, block_k=128, num_stages=3, threads=384)
LONG_TILES_OUTLIER = dict(block_m=256, block_n=128, block_k=128, num_stages=4, threads=256)
MEDIUM_TILES = dict(block_m=128, block_n=128, block_k=128, num_stages=4, threads=256)
# Blocks a SM the tensor-core decode kernels are built for (QUAD_DECODE_GEMM_BLOCKS; 1: TileLang's
# warp-specialized pipeline, the measured default; 2 or 3: see gemm_decode._decode_pass_configs).
DECODE_GEMM_BLOCKS = int(os.environ.get("QUAD_DECODE_GEMM_BLOCKS", "1"))
SMEM_PER_SM = 227 * 1024
SMS = 132  # streaming multiprocessors of an H100 SXM or H200: the grids' waves are counted in them
WS_TILES = dict(block_m=256, block_n=128, block_k=128)
# Four K stages: with the epilogue's scales staged by cp.async (gemm_rs's stage_scales) they fit
# beside the epilogue's tiles; measured (bench/sweeps.py --rs-epilogue, H200, 2048 tokens) against
# three stages and the scales read from global memory: gate_up 370.0 -> 362.1 µs, down 162.0 ->
# 150.8, qkv 82.6 -> 76.8, o_proj 63.4 -> 53.2, all outputs bit-equal.
RS_TILES = dict(block_t=256, block_w=128, block_k=128, num_stages=4)
# The register-unpack kernel's blocks run in panels of RS_PANEL token tiles (gemm_rs's panel) where
# the packed weight is larger than RS_PANEL_MIN_BYTES: launch order reads such a weight from DRAM
# once per token tile, a panel once per panel. Measured (bench/sweeps.py --rs-panel, H200): gate_up
# 28672 x 4096 (56 MiB) 386.9 -> 367.4 µs at 2048 tokens, 6.51 -> 5.97 ms at 32768, even at 8192;
# the weights that fit in L2 (qkv, o_proj, down_proj: 8-28 MiB) within +-4% either way, so they keep
# launch order. QUAD_RS_PANEL=0: launch order everywhere.
RS_PANEL = int(os.environ.get("QUAD_RS_PANEL", "8"))
RS_PANEL_MIN_BYTES = 40 << 20
# Time per token of a register-unpack tile relative to the 256-token tile: a 128-token tile pays
# its weights' unpack and pipeline for half the tokens (measured 1.35-1.45x at equal waves: gate_up
# at 256 tokens, 85.8 against 62.2 µs).
RS_TOKEN_COST = {256: 1.0, 128: 1.4}
# Blocks a SM for the register-unpack decode kernels with their TMA producer warp group kept
# (QUAD_DECODE_GEMM_RESIDENT; 1: setmaxnreg gives the consumer 240 registers, one block a SM, each
# block's pipeline ramp and epilogue leaving the SM's memory pipe idle; 2: no setmaxnreg,
# __launch_bounds__(256, 2), K tiles whose shared memory fits twice, see
# gemm_decode._resident_warp_specialized). gate_up (448 tiles) at 16 / 32 / 64 tokens from CUDA
# graphs: 22.1 / 27.0 / 35.0 µs against 28.2 / 33.7 / 42.3 (69% of copy at 16); qkv (96 tiles, a
# block a SM either way) 8.6 / 9.5 / 12.6 against 8.3 / 9.9 / 11.7 (the smaller K tiles); the
# engine's b32 step with every decode GEMM so, 3.956 against 4.283 ms
# (bench/results/gemm_resident_decode_h200_2026-12-02.json, decode_ab_h200_2026-12-02d.json).
DECODE_RESIDENT = int(os.environ.get("QUAD_DECODE_GEMM_RESIDENT", "2"))
# K splits of the resident plan for grids that must split K aim at DECODE_FILL x 0.7 of the SMs
# (QUAD_DECODE_GEMM_FILL; 2: o / down 65 tiles x 4 splits, two blocks a SM, instead of about one
# block a SM; at 16 tokens with 512-wide K tiles instead of 1024, where those do not split that far).
# From CUDA graphs at 16 / 32 / 64 tokens (bench/results/kernels_fill_h200_2026-12-02.json): down
# 12.6 / 15.3 / 19.5 µs against 14.1 / 16.1 / 23.2, o 7.6 / 10.1 / 13.7 against 7.9 / 10.1 / 14.3;
# qkv's 96 tiles split in two (the first form of the switch) lost 7-18%, so grids that fill the
# SMs unsplit stay unsplit.
DECODE_FILL = float(os.environ.get("QUAD_DECODE_GEMM_FILL", "1"))
DECODE_WS_MIN_WAVES = 2
DECODE_WS_TILES = dict(block_k=256, num_stages=3)


# Time per token row of a tile relative to the 384-row tile: the unpack of a weight tile is ~9% of
# a 384-row tile's time (1080-1100 int8-equivalent TOPS against 1180-1240 for a plain int8 GEMM at
# the same tiles, H100), so over 256 rows it costs 1.5x as much a row.
ROW_COST = {384: 1.0, 256: 1.05, 128: 1.2}


def fit_k(tiles: dict, k: int) -> dict:
    tiles = dict(tiles)
    while k % tiles["block_k"]:  # K tiles shrink to divide k (SmolLM2's 576)
        tiles["block_k"] //= 2
    return tiles


def prefill_candidates(m: int, k: int, rank: int = 0, has_bias: bool = False) -> list[dict]:
    """Tile configurations a prefill of m tokens may use: 128 x 128 below 1024 tokens (where the
    grid would otherwise not fill the GPU); above, 384 x 128 (three consumer warpgroups of 128
    tokens share each unpacked weight tile) and 256 x 128. With an outlier product or a bias only
    256 x 128: that epilogue does not fit the 128 registers a thread of a 4-warpgroup block gets
    (ptxas spills ~1 KB)."""
    if m < 1024:
        return [fit_k(MEDIUM_TILES, k)]
    return [fit_k(LONG_TILES_OUTLIER, k)] + ([] if rank or has_bias else [fit_k(LONG_TILES, k)])


def prefill_tiles(m: int, n: int, k: int, rank: int = 0, has_bias: bool = False, sms: int = SMS) -> dict:
    """The candidate with the least estimated time: whole waves of tiles over the SMs, times the
    tile's rows, times their relative cost (ROW_COST). Waves matter: the 4160-wide o_proj / down_proj
    outputs of Llama-3-8B (4096 + r) are 33 column tiles, so 2048 tokens in 384-row tiles are 198
    tiles, two waves of which the second is half empty (H100: 700-800 TOPS there against 960-1080
    at 8192 tokens); 256-row tiles make 264, two full waves."""
    def cost(t):
        tiles = -(-m // t["block_m"]) * -(-n // t["block_n"])
        return -(-tiles // sms) * t["block_m"] * ROW_COST[t["block_m"]]
    # The model is coarse: keep the largest tile unless a smaller one is estimated 10% faster.
    candidates = sorted(prefill_candidates(m, k, rank, has_bias), key=lambda t: -t["block_m"])
    best = min(cost(t) for t in candidates)
    return next(t for t in candidates if cost(t) <= best / 0.9)


def rs_tiles(m: int, n: int, k: int, sms: int = SMS) -> dict:
    """The register-unpack prefill kernel's tiles for m tokens: 256-token tiles, or 128-token ones
    where whole waves of them cost less (RS_TOKEN_COST): the 33 weight tiles of a 4160-wide o_proj
    / down_proj at 512 tokens are 66 tiles of 256 tokens, half the SMs idle, or 132 of 128."""
    def cost(block_t):
        tiles = -(-n // RS_TILES["block_w"]) * -(-m // block_t)
        return -(-tiles // sms) * block_t * RS_TOKEN_COST[block_t]
    return rs_fit(n, k, min(RS_TOKEN_COST, key=cost))


def rs_fit(n: int, k: int, block_t: int) -> dict:
    """RS_TILES with these token tiles, K tiles that divide k and the panel for this weight."""
    panel = RS_PANEL if n * k // 2 > RS_PANEL_MIN_BYTES else 0
    return fit_k({**RS_TILES, "block_t": block_t, "panel": panel}, k)


def decode_smem(block_m: int, block_k: int, stages: int) -> int:
    """Shared memory of a decode block: the pipelined activation and packed weight tiles, the
    unpacked weight tile and the epilogue's float32 tile (64 weight rows)."""
    return stages * (block_m * block_k + 64 * block_k // 2) + 64 * block_k + 64 * block_m * 4


def _k_split(tiles: int, k: int, block_k: int, sms: int) -> int:
    """K splits (a power of two, at least two K tiles each) until the grid fills ~0.7 of the SMs."""
    split = 1
    while tiles * split < 0.7 * sms and k % (block_k * split * 2) == 0 and k // (block_k * split * 2) >= 2:
        split *= 2
    return split


def decode_rs_smem(block_m: int, block_k: int, stages: int) -> int:
    """Shared memory of a register-unpack decode block: the pipelined activation and packed weight
    tiles and the epilogue's float32 tile (64 weight rows); no unpacked tile."""
    return stages * (block_m * block_k + 64 * block_k // 2) + 64 * block_m * 4


# (K tile, stages) a decode block may take where several must share a SM, deepest K tile first.
SHARED_SM_TILES = ((1024, 2), (512, 3), (512, 2), (256, 3), (256, 2))


def _tiles_within(smem, block_m: int, k: int, budget: int) -> list[tuple[int, int]]:
    """The SHARED_SM_TILES that divide k and whose shared memory smem(block_m, bk, stages) fits budget."""
    return [(bk, st) for bk, st in SHARED_SM_TILES if k % bk == 0 and smem(block_m, bk, st) <= budget]


def decode_plan(m: int, n: int, k: int, sms: int = SMS, min_blocks: int | None = None,
                resident: int | None = None) -> dict:
    """Token tile, K tile and K split for the split-K kernel: split until the grid fills ~0.7 of
    the SMs (more splits cost more than the idle SMs, measured at Llama-3-8B shapes). min_blocks
    (default DECODE_GEMM_BLOCKS) > 1: the deepest K tile and pipeline whose shared memory lets that
    many blocks share a SM, and the plan says min_blocks (where none fits, the default plan).
    resident (default DECODE_RESIDENT) > 1, for the register-unpack kernels: the same choice for
    that many warp-specialized blocks a SM, and the plan says ws_blocks."""
    min_blocks = min_blocks or DECODE_GEMM_BLOCKS
    resident = resident or DECODE_RESIDENT
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    tiles = n // 64 * -(-m // block_m)
    if resident > 1 and min_blocks == 1:
        fits = _tiles_within(decode_rs_smem, block_m, k, SMEM_PER_SM // resident - 2048)
        if fits:
            # Grids that must split K anyway (fewer tiles than 0.7 of the SMs) aim at DECODE_FILL x
            # 0.7 of the SMs with the deepest K tile that splits that far (with FILL 1 the first);
            # grids that fill the SMs unsplit stay unsplit (qkv's 96 tiles split in two lost 7-18%).
            target = int(sms * DECODE_FILL) if tiles < 0.7 * sms else sms
            plans = [(bk, st, _k_split(tiles, k, bk, target)) for bk, st in fits]
            block_k, stages, split = next((p for p in plans if tiles * p[2] >= 0.7 * target), plans[0])
            return dict(block_m=block_m, block_k=block_k, split=split, num_stages=stages, ws_blocks=resident)
    if min_blocks > 1:
        fits = _tiles_within(decode_smem, block_m, k, SMEM_PER_SM // min_blocks - 1024)
        if fits:
            block_k, stages = fits[0]
            return dict(block_m=block_m, block_k=block_k, split=_k_split(tiles, k, block_k, sms), num_stages=stages,
                        min_blocks=min_blocks)
    block_k = 512
    while k % block_k:
        block_k //= 2
    split = _k_split(tiles, k, block_k, sms)
    stages = 3 if block_k == 512 else 4
    # 1024-wide K tiles in two stages where shared memory holds them (up to 32 tokens): 2-14% faster
    # than 512 x 3 at every Llama-3-8B decode shape in bench/results/decode_sweep_h200_2026-11-30.json.
    if block_m <= 32 and block_k == 512 and k % (1024 * split) == 0 and k // (1024 * split) >= 2:
        block_k, stages = 1024, 2
    return dict(block_m=block_m, block_k=block_k, split=split, num_stages=stages)


def decode_ws_fits(m: int, n: int, k: int, plan: dict, sms: int = SMS) -> bool:
    """Whether the producer-unpack decode kernel takes a problem: one block covers K (no split), the
    grid is at least DECODE_WS_MIN_WAVES waves and K holds its pipeline."""
    tiles = n // 64 * -(-m // plan["block_m"])
    k_tiles, rem = divmod(k, DECODE_WS_TILES["block_k"])
    return (plan["split"] == 1 and n % 64 == 0 and tiles >= DECODE_WS_MIN_WAVES * sms
            and rem == 0 and k_tiles >= DECODE_WS_TILES["num_stages"])
