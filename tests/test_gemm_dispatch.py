"""The GEMM dispatch's choice of kernel per shape (CPU: no kernel is built)."""

import pytest

pytest.importorskip("tilelang")


def test_prefill_tiles_avoid_a_half_empty_last_wave():
    from kernels_tl.gemm_dispatch import prefill_tiles
    # Llama-3-8B o_proj / down_proj outputs: 4096 + 64 outlier channels = 33 column tiles. 2048
    # tokens in 384-row tiles: 198 tiles on 132 SMs, a second wave half empty; 256-row: 264, two full.
    assert prefill_tiles(2048, 4160, 4096)["block_m"] == 256
    assert prefill_tiles(2048, 4160, 14336)["block_m"] == 256
    # Enough waves that the tail is small: the 384-row tile (its unpack shared by more tokens).
    assert prefill_tiles(32768, 4160, 14336)["block_m"] == 384
    assert prefill_tiles(4096, 4160, 4096)["block_m"] == 384
    # Outlier product or bias: 256-row tiles only; short prompts: 128.
    assert prefill_tiles(32768, 6144, 4096, rank=64)["block_m"] == 256
    assert prefill_tiles(8192, 4096, 4096, has_bias=True)["block_m"] == 256
    assert prefill_tiles(500, 4160, 4096)["block_m"] == 128
    # K tiles divide k (SmolLM2's 576).
    assert 576 % prefill_tiles(2048, 640, 576)["block_k"] == 0


def test_prebuild_covers_every_tile_the_dispatch_can_pick(monkeypatch):
    from kernels_tl import gemm_dispatch
    built = []
    monkeypatch.setattr(gemm_dispatch, "w4ax_gemm", lambda n, k, rank, bias, dtype, **t: built.append((n, t["block_m"])))
    gemm_dispatch.prebuild([(1024, 4160, 4096, 0, False, "float16"), (1024, 6144, 4096, 64, False, "float16")])
    assert sorted(built) == [(4160, 256), (4160, 384), (6144, 256)]
    for m in range(1024, 9000, 512):  # whatever a prefill of that class picks was built
        assert (4160, gemm_dispatch.prefill_tiles(m, 4160, 4096)["block_m"]) in built
