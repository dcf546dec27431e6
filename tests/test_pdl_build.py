"""Every kernel of the decode step is built for programmatic dependent launch (kernels_tl.pdl): it
waits for the previous kernel in the stream before its first global-memory access, then lets the
next one launch. The prefill GEMM (warp-specialized, one launch per layer op at 2048 tokens) is
built without it."""

import re
import shutil

import pytest

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from kernels_tl import pdl  # noqa: E402

SYNC, TRIGGER = "cudaGridDependencySynchronize();", "cudaTriggerProgrammaticLaunchCompletion();"


def _decode_step_kernels():
    from kernels_tl.gemm_decode import SM90, w4ax_epilogue, w4ax_gemm_decode, w4ax_gemm_splitk
    from kernels_tl.gemv import w4ax_gemv
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_cluster import hadamard_quant_cluster
    from kernels_tl.head_gemv import head_gemv
    from kernels_tl.kv_attention import attention_combine, attention_decode
    from kernels_tl.kv_store import kv_store
    from kernels_tl.quantize import rmsnorm_quant
    return {
        "rmsnorm_quant": lambda: rmsnorm_quant(64 + 4096, 64, 4096, 4, 0.9, 1e-5, target=SM90, residual="add"),
        "hadamard_quant": lambda: hadamard_quant(1536, hadamard_factors(1536), None, 8, 0.9, target=SM90, gated=True),
        "hadamard_quant_cluster": lambda: hadamard_quant_cluster(1536, hadamard_factors(1536), 4, 0.9, target=SM90,
                                                                 gated=True),
        "w4ax_gemv": lambda: w4ax_gemv(4160, 4096, 64, True, "float16", 1, target=SM90),
        "w4ax_gemm_decode": lambda: w4ax_gemm_decode(6144, 4096, 64, True, "float16", 32, 1024, 2, target=SM90),
        "w4ax_gemm_splitk": lambda: w4ax_gemm_splitk(4160, 4096, 2, block_m=16, block_k=512, num_stages=2,
                                                     target=SM90),
        "w4ax_epilogue": lambda: w4ax_epilogue(4160, 64, True, "float16", 16, target=SM90),
        "head_gemv": lambda: head_gemv(1024, 512, 64, 4, target=SM90),
        "kv_store": lambda: kv_store(8, 128, target=SM90),
        "attention_decode": lambda: attention_decode(32, 8, 128, 4, target=SM90),
        "attention_combine": lambda: attention_combine(32, 128, 4, target=SM90),
    }


FAMILY = {"rmsnorm_quant": "norm", "hadamard_quant": "hadamard_quant", "hadamard_quant_cluster": "hadamard_quant",
          "w4ax_gemv": "gemv", "w4ax_gemm_decode": "gemm", "w4ax_gemm_splitk": "gemm", "w4ax_epilogue": "gemm_epilogue",
          "head_gemv": "head", "kv_store": "kv_store", "attention_decode": "attention", "attention_combine": "attention"}


@pytest.mark.parametrize("name", list(FAMILY))
def test_decode_step_kernels_wait_for_their_producer_first(name):
    if not pdl.enabled(FAMILY[name]) or FAMILY[name] in pdl.LATE:
        pytest.skip("built without an early trigger (QUAD_PDL switches)")
    src = _decode_step_kernels()[name]().get_kernel_source()
    body = src[src.index("{", src.index("__launch_bounds__")):]
    assert body.count(SYNC) == 1 and body.count(TRIGGER) == 1
    before = body[:body.index(SYNC)]
    # Nothing before the wait touches a kernel argument (global memory): only declarations, shared
    # buffer set-up and index arithmetic.
    params = re.findall(r"\b(\w+)\b(?=[,)])", src[src.index("(", src.index("__launch_bounds__")):src.index("{",
                                                     src.index("__launch_bounds__"))])
    # The GEMV may request its first weight chunks first (weights are never written in a step).
    early = {"WQ"} if name == "w4ax_gemv" and pdl.prefetch_weights("gemv") else set()
    touched = [p for p in params if p not in early and (re.search(rf"\b{p}\s*\[", before)
                                                        or re.search(rf"\b{p}\s*\+", before))]
    assert early <= {p for p in params if re.search(rf"\b{p}\s*\+", before)}
    assert not touched, f"{name} reads or writes {touched} before waiting for the previous kernel"
    assert body.index(SYNC) < body.index(TRIGGER)


def test_prefill_gemm_is_an_ordinary_launch():
    from kernels_tl.gemm import SM90, w4ax_gemm
    from kernels_tl.gemm_plans import prefill_candidates
    tiles = next(t for t in prefill_candidates(2048, 1536, 64, False) if t["block_m"] == 256)
    src = w4ax_gemm(640, 1536, 64, False, "float16", target=SM90, **tiles).get_kernel_source()
    assert SYNC not in src and TRIGGER not in src
