"""GPU check of the GEMM kernels: compile every kernel the GPU tests need in parallel, then run them.

    python scripts/gpu_gemm_check.py [pytest args]
"""

import sys

import pytest

from kernels_tl import gemm_dispatch
from tests.test_gemm_gpu import MS, SHAPES

problems = [(m, n, k, 0, False, "float32") for n, k in SHAPES for m in MS]
problems += [(m, n, k, rank, True, "float16") for n, k in SHAPES[:3] + SHAPES[6:] for m in MS for rank in (0, 64)]
problems += [(9, 4160, 4096, 0, False, "float16")]  # the split-K workspace test
gemm_dispatch.prebuild(problems)
sys.exit(pytest.main(["-q", "-m", "gpu", "tests/test_gemm_gpu.py", *sys.argv[1:]]))
