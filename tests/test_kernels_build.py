"""Every TileLang kernel builds for sm_90a without a GPU, and the GEMMs' integer part runs on wgmma."""

import shutil

import pytest

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)


@pytest.mark.parametrize("tiles", ["prefill", "decode"])
@pytest.mark.parametrize("act_bits,rank,bias", [(4, 64, False), (8, 0, False), (4, 32, True)])
def test_gemm_builds_with_int8_wgmma(act_bits, rank, bias, tiles):
    from kernels_tl.gemm import DECODE_TILES, SM90, w4ax_gemm
    kernel = w4ax_gemm(640, 1536, rank, act_bits, bias, "float16", target=SM90,
                       **(DECODE_TILES if tiles == "decode" else {}))
    src = kernel.get_kernel_source()
    # The unpacked weight tile feeds int8 wgmma from registers; the outlier slice runs on fp16 wgmma.
    assert "wgmma_rs<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32" in src
    assert "mma_sync" not in src
    assert ("wgmma_ss<tl::DataType::kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32" in src) == (rank > 0)
