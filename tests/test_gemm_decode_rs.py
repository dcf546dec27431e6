"""The register-unpack decode GEMMs (kernels_tl.gemm_decode_rs) without a GPU: their per-element
unpack against the checkpoint's packing, their build for sm_90a (int8 wgmma with the weights from
registers, registers that fit the requested blocks per SM, no spills) and the dispatch switch."""

import shutil

import pytest
import torch

from kernels_tl import reference as ref


def test_unpack_index_formula_gives_16q_for_the_checkpoint_packing():
    """The kernel's elementwise unpack, evaluated in torch: weight j of a row is the low (j % 8 < 4)
    or high nibble of packed byte (j // 8)·4 + j % 4, shifted into the high half of an int8."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 256), generator=g, dtype=torch.int8)
    packed = ref.pack_int4(q)
    j = torch.arange(256)
    byte = packed[:, (j // 8) * 4 + j % 4].to(torch.int32)
    shift = 4 - 4 * ((j % 8) // 4)
    frag = ((byte << shift) & 0xF0).to(torch.uint8).view(torch.int8)
    assert torch.equal(frag.to(torch.int32), 16 * q.to(torch.int32))


def test_consumer_registers_fit_the_requested_blocks_per_sm():
    from kernels_tl.gemm_decode_rs import PRODUCER_REGS, consumer_regs
    assert consumer_regs(1) == 240
    for blocks in (2, 3, 4):
        regs = consumer_regs(blocks)
        assert regs % 8 == 0 and blocks * 128 * (regs + PRODUCER_REGS) <= 65536


def test_dispatch_takes_the_register_unpack_kernels_when_switched_on(monkeypatch):
    from kernels_tl import gemm_dispatch as gd
    from kernels_tl import gemm_decode_rs as rs
    monkeypatch.setattr(gd, "DECODE_REGISTER_UNPACK", True)
    (fused,) = gd.kernel_specs(32, 6144, 4096, 64, False, "float16")              # 96 tiles: one block covers K
    assert fused[0] is rs.w4ax_gemm_decode_rs and fused[1][-1] == gd.RS_TILES["min_blocks"]
    split, epilogue = gd.kernel_specs(32, 4160, 4096, 0, False, "float16")        # 65 tiles: split along K
    assert split[0] is rs.w4ax_gemm_splitk_rs and dict(split[2])["block_k"] == 256
    assert epilogue[0] is gd.w4ax_epilogue
    assert gd.kernel_specs(2, 6144, 4096, 0, False, "float16")[0][0] is gd.w4ax_gemv   # GEMV tokens unchanged
    monkeypatch.setattr(gd, "DECODE_REGISTER_UNPACK", False)
    assert gd.kernel_specs(32, 6144, 4096, 64, False, "float16")[0][0] is gd.w4ax_gemm_decode


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("split,min_blocks", [(1, 1), (1, 3), (2, 3)])
def test_register_unpack_kernels_build_for_sm90(split, min_blocks, tmp_path):
    pytest.importorskip("tilelang")
    from kernels_tl.gemm import SM90
    from kernels_tl.gemm_decode_rs import consumer_regs, w4ax_gemm_decode_rs, w4ax_gemm_splitk_rs
    if split == 1:
        src = w4ax_gemm_decode_rs(6144, 4096, 64, False, "float16", 32, 256, 4, min_blocks, target=SM90)
    else:
        src = w4ax_gemm_splitk_rs(4160, 4096, split, 32, 256, 4, min_blocks, target=SM90)
    src = src.get_kernel_source()
    # The weights reach wgmma from registers; the tokens from shared memory; no int8 weight tile.
    assert "wgmma_rs<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    assert "wgmma_ss<tl::DataType::kInt8" not in src and "quad_unpack_int4x32" not in src
    assert ("AtomicAdd" in src) == (split > 1)
    assert ("kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32, 64" in src) == (split == 1)  # outliers
    assert f"__launch_bounds__(256, {min_blocks})" in src
    assert f"warpgroup_reg_alloc<{consumer_regs(min_blocks)}>" in src
    from test_quantize_build import ptxas_spills
    assert ptxas_spills(src, tmp_path) == [0, 0]
