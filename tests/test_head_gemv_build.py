"""The int8 lm_head's decode GEMV (kernels_tl.head_gemv) builds for sm_90a without a GPU: dp4a on
the CUDA cores, warp-shuffle reductions, no register spills (checked with ptxas)."""

import re
import shutil

import pytest

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from test_quantize_build import ptxas_spills  # noqa: E402


# Llama-3-8B's head (128256 x 4096, r = 64) at every compiled token width; a small table; a ragged
# one (rows per block do not divide 1000) without outlier channels.
@pytest.mark.parametrize("n,k,rank,tokens", [(128256, 4096, 64, 1), (128256, 4096, 64, 2), (128256, 4096, 64, 4),
                                             (1024, 512, 64, 4), (1000, 576, 0, 2)])
def test_head_gemv_builds_on_dp4a_without_spills(n, k, rank, tokens, tmp_path):
    from kernels_tl.head_gemv import SM90, head_gemv
    src = head_gemv(n, k, rank, tokens, target=SM90).get_kernel_source()
    assert "__dp4a(" in src and "quad_dot_int8x16(" in src and "warp_reduce_sum" in src
    assert not re.search(r"\b(wg)?mma", src)  # CUDA cores only
    # The scales are applied as separately rounded products, in the reference's order.
    assert "__fmul_rn(__fmul_rn(" in src
    assert ("__fadd_rn(" in src) == (rank > 0)
    assert not any(ptxas_spills(src, tmp_path))


def test_vocab_sizes_fill_whole_blocks():
    """Llama-3, SmolLM2 and Qwen2.5 vocabularies are multiples of the default 16 rows per block, so
    their kernels carry no row guard (128256 = 2^8 * 501, 49152 = 2^14 * 3, 151936 = 2^7 * 1187)."""
    assert all(v % 16 == 0 for v in (128256, 49152, 151936))
