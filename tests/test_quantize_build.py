"""The activation quantizers build for sm_90a without a GPU: reference rounding, vector memory access,
exactly the barriers the kernel places itself, and no register spills (checked with ptxas)."""

import re
import shutil
import subprocess

import pytest

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)


def ptxas_log(src: str, tmp_path) -> str:
    """ptxas -v's report on the generated CUDA source, device code only (kernels that resize their
    warpgroups' registers with setmaxnreg do not build as host code)."""
    from tilelang import env
    cu = tmp_path / "kernel.cu"
    cu.write_text(src)
    out = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90a", "-O3", "-Xptxas", "-v", "-cubin", str(cu), "-o",
         str(tmp_path / "k.cubin"), f"-I{env.TILELANG_TEMPLATE_PATH}", f"-I{env.CUTLASS_INCLUDE_DIR}"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def ptxas_spills(src: str, tmp_path) -> list[int]:
    """(spill store bytes, spill load bytes) of the generated CUDA source, from ptxas -v."""
    log = ptxas_log(src, tmp_path)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, log[-2000:]
    return [int(v) for pair in spills for v in pair]


def assert_reference_rounding(src: str):
    # rint (round half to even) of the IEEE quotient (Markstein's FMA correction of x·(1/scale)),
    # never the approximate fast-math forms.
    assert "nearbyintf(" in src or "rintf(" in src
    assert "__fmaf_rn(" in src
    assert "__fdividef" not in src and "__frcp" not in src


@pytest.mark.parametrize("rank,d,bits", [(0, 4096, 4), (64, 4096, 8)])
def test_rmsnorm_quant_builds(rank, d, bits, tmp_path):
    from kernels_tl.quantize import SM90, rmsnorm_quant
    src = rmsnorm_quant(rank + d, rank, d, bits, 0.9, 1e-5, target=SM90).get_kernel_source()
    assert_reference_rounding(src)
    assert "*(uint4*)(H +" in src                       # 16-byte loads of the residual row
    assert "*(int2*)(XQ +" in src                       # 8 int8 values per store
    assert src.count("__syncthreads()") == 2            # one per block reduction, nothing else
    assert ("XO[" in src or "(XO +" in src) == (rank > 0)
    assert ptxas_spills(src, tmp_path) == [0, 0]


@pytest.mark.parametrize("n,bits", [(14336, 4), (576, 8), (11008, 4)])
def test_hadamard_quant_builds(n, bits, tmp_path):
    from kernels_tl.hadamard import block_hadamard_size, hadamard_factors
    from kernels_tl.hadamard_quant import SM90, hadamard_quant
    from kernels_tl.hadamard_rows import _layout
    factors, block = hadamard_factors(n), None
    if factors is None:  # 11008: block-diagonal fallback
        block = block_hadamard_size(n)
        factors = hadamard_factors(block)
    src = hadamard_quant(n, factors, block, bits, 0.9, target=SM90).get_kernel_source()
    assert_reference_rounding(src)
    assert "extern __shared__" in src                   # the fp32 row: dynamic shared memory
    assert "*(float4*)(" in src                         # butterfly passes: 16-byte smem accesses
    assert "*(int4*)(XQ +" in src                       # 16 int8 values per store
    # Barriers: after the load phase, after each shared-memory butterfly pass but the last, and the
    # amax reduction. TileLang's own sync insertion would add one per store.
    assert src.count("__syncthreads()") == len(_layout(n, tuple(factors), block).plan) + 1
    assert ptxas_spills(src, tmp_path) == [0, 0]


@pytest.mark.parametrize("threads", [None, 512])  # the width rule's block, the decode steps' (ragged: 520 vectors)
@pytest.mark.parametrize("residual", ["float32", "add", "splitk"])
def test_rmsnorm_quant_float32_residual_variants_build(residual, threads, tmp_path):
    from kernels_tl.quantize import SM90, rmsnorm_quant
    src = rmsnorm_quant(64 + 4096, 64, 4096, 4, 0.9, 1e-5, target=SM90, threads=threads,
                        residual=residual).get_kernel_source()
    assert_reference_rounding(src)
    # (kernels built for programmatic dependent launch lose __restrict__: TileLang drops it so that
    # no read-only-cache load can be hoisted above the wait for the previous kernel)
    assert re.search(r"float\* (__restrict__ )?H\b", src)  # the float32 residual
    adds = residual in ("add", "splitk")
    assert ("*(float4*)(H +" in src) and (src.count("*(float4*)(H +") == (2 if adds else 1))
    assert bool(re.search(r"const half_t\* (__restrict__ )?D\b", src)) == (residual == "add")
    assert bool(re.search(r"int\* (__restrict__ )?ACC\b", src)) == (residual == "splitk")
    if adds:  # every load of the row comes before the first store (which might alias it)
        lines = [line.strip() for line in src[src.index("main_kernel("):].splitlines()]
        loads = [i for i, line in enumerate(lines) if re.search(r"= \*\(\w+\*\)\((H|D|ACC|WS) \+", line)]
        stores = [i for i, line in enumerate(lines) if re.match(r"\*\(\w+\*\)\((H|ACC) \+", line)]
        assert len(loads) == (3 if residual == "splitk" else 2) and stores and max(loads) < min(stores)
        # in a loop over the row's vectors of its own (the source keeps the loops rolled)
        assert any(line.startswith("for (int v") for line in lines[max(loads):min(stores)])
    if residual == "splitk":  # the epilogue's float32 operations, then the float16 rounding of the branch
        assert "((half_t)(((float)dv[" in src and "* 0x1p-4f" in src
    assert src.count("__syncthreads()") == 2
    assert ptxas_spills(src, tmp_path) == [0, 0]


def test_gated_hadamard_quant_builds(tmp_path):
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import SM90, hadamard_quant
    src = hadamard_quant(1536, hadamard_factors(1536), None, 8, 0.9, target=SM90, gated=True).get_kernel_source()
    assert_reference_rounding(src)
    assert "expf(" in src and "__expf" not in src       # silu with the precise exp, as torch's kernel
    assert ptxas_spills(src, tmp_path) == [0, 0]


@pytest.mark.parametrize("cluster", [None, 2])
def test_fast_silu_variant_uses_the_approximate_exp_and_reciprocal(cluster, tmp_path):
    from kernels_tl.hadamard_quant import SM90, hadamard_quant
    from kernels_tl.hadamard_quant_cluster import hadamard_quant_cluster
    if cluster:
        src = hadamard_quant_cluster(14336, (28, 512), 8, 0.9, target=SM90, cluster=cluster, gated=True,
                                     fast_silu=True).get_kernel_source()
    else:
        src = hadamard_quant(14336, (28, 512), None, 8, 0.9, target=SM90, gated=True,
                             fast_silu=True).get_kernel_source()
    assert_reference_rounding(src)  # the quantizer itself rounds as the reference
    assert src.count("__expf(") == src.count("expf(") >= 1 and "tl::fast_rcp(" in src  # no precise expf left
    assert ptxas_spills(src, tmp_path) == [0, 0]


@pytest.mark.parametrize("n,gated", [(14336, True), (4096, False), (1536, True)])
def test_cluster_hadamard_quant_builds(n, gated, tmp_path):
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant_cluster import SM90, hadamard_quant_cluster
    kernel = hadamard_quant_cluster(n, hadamard_factors(n), 4, 0.9, target=SM90, gated=gated)
    src = kernel.get_kernel_source()
    assert_reference_rounding(src)
    # The exchange: two cluster barriers, the peers' columns read and the block maxima pushed
    # through distributed shared memory.
    assert src.count("quad_cluster_sync();") == 2
    assert "ld.shared::cluster.f32" in src and "st.shared::cluster.f32" in src
    # One shared buffer (columns, products, reduction slots): nothing overlaid on what peers read.
    assert src.count("extern __shared__") == 1 and "buf_dyn_shmem" not in src
    assert ptxas_spills(src, tmp_path) == [0, 0]


def test_cluster_layout_declines_rows_it_cannot_split():
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant_cluster import cluster_layout
    assert cluster_layout(14336, (28, 512), None) == (28, 512)
    assert cluster_layout(576, tuple(hadamard_factors(576)), None) is None      # 16 columns: 2 a rank
    assert cluster_layout(18944, tuple(hadamard_factors(18944)), None) is None  # 148-point factor
    assert cluster_layout(11008, (1, 256), 256) is None                        # block-diagonal fallback


@pytest.mark.parametrize("n,gated,fast", [(14336, True, True), (14336, False, False), (4096, False, False)])
def test_stream_hadamard_quant_builds(n, gated, fast, tmp_path):
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant_stream import SM90, blocks_per_sm, hadamard_quant_stream
    factors = hadamard_factors(n)
    resident = blocks_per_sm(n, factors, None, gated)
    src = hadamard_quant_stream(n, factors, None, 8, 0.9, 132 * resident, target=SM90, gated=gated,
                                fast_silu=fast).get_kernel_source()
    assert_reference_rounding(src)
    # The next row's copy: 16-byte cp.async, committed, and waited on once a row before it is read.
    assert "cp.async.cg.shared.global" in src
    assert src.count("quad_cp_async_commit();") == 2 and src.count("quad_cp_async_wait_all();") == 1
    assert f", {resident})" in src[src.index("__launch_bounds__"):][:40]  # the residency the grid assumes
    assert ptxas_spills(src, tmp_path) == [0, 0]


def test_mma_hadamard_quant_builds_with_tensor_core_products(tmp_path):
    """The gated quantizer with the dense factor on the tensor cores: ldmatrix.trans and mma.sync in
    the source, the next row's copy as in the stream kernel, the residency its grid assumes, no
    spills; and the rows it declines."""
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant_mma import SM90, hadamard_quant_mma, mma_fits
    from kernels_tl.hadamard_quant_stream import blocks_per_sm
    n = 14336
    factors = hadamard_factors(n)
    resident = blocks_per_sm(n, factors, None, True)
    src = hadamard_quant_mma(n, factors, 8, 0.9, 132 * resident, target=SM90).get_kernel_source()
    assert "__float2int_rn(" in src and "__fmaf_rn(" in src  # round half to even of the IEEE quotient
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in src and "mma_sync<" in src
    assert src.count("quad_cp_async_commit();") == 2 and src.count("quad_cp_async_wait_all();") == 1
    assert f", {resident})" in src[src.index("__launch_bounds__"):][:40]
    spill_store, spill_load = ptxas_spills(src, tmp_path)
    assert spill_store <= 64 and spill_load <= 64  # a few loop-invariant addresses at most
    assert mma_fits(n, factors, None, True)
    assert not mma_fits(n, factors, None, False)                                   # plain rows
    assert not mma_fits(18944, tuple(hadamard_factors(18944)), None, True)         # 148-point factor
    assert not mma_fits(4096, tuple(hadamard_factors(4096)), None, True)           # no dense factor
    assert not mma_fits(11008, (1, 256), 256, True)                                # block-diagonal
    assert not mma_fits(10240, (20, 512), None, True)  # 20 rows: padding rows 8 lower would not exist


def test_mma_quantizer_addresses_follow_its_swizzle():
    """The mma quantizer's hoisted address forms (sb, lm, the P chunks) equal its _swizzle of the
    positions they stand for; _swizzle is a permutation; the fragment stores and the last pass's
    loads of a quarter-warp / warp hit distinct banks."""
    from kernels_tl.hadamard_quant_mma import COLS, _swizzle
    n, f = 14336, 28
    assert sorted(_swizzle(s) for s in range(n)) == list(range(n))
    for tx in range(256):
        warp, lane = tx // 32, tx % 32
        g, t = lane // 4, lane % 4
        sb = (t * 1024 + warp * 8 + g) ^ (t * 8)
        for j in range(4):
            for h in range(2):
                for nt in range(4):
                    for e in range(2):
                        o, col = nt * 8 + 2 * t + e, warp * 8 + 64 * j + 256 * h + g
                        at = (sb ^ (4 * j + 16 * h)) + (nt * 8 + e) * COLS + 64 * j + 256 * h
                        assert at == _swizzle(o * COLS + col)
        lm = (tx % 8) ^ (((tx // 16) % 4) * 2)
        for q in range(16):
            assert tx * 64 + 32 * (q // 8) + 4 * ((q % 8) ^ lm) == _swizzle(tx * 64 + 4 * q)
        pc = (tx % 64) ^ (tx // 64)
        for kk in range(7):  # SwiGLU chunk c: row c // 64, column chunk (c % 64) ^ (row % 8)
            c = kk * 256 + tx
            assert kk * 1024 + (tx // 64) * 256 + (pc ^ (kk % 2 * 4)) * 4 == (c // 64) * 256 + ((c % 64) ^ (c // 64 % 8)) * 4
    for warp in range(8):  # one fragment store: 32 lanes, 32 banks
        for j, h, nt, e in [(0, 0, 0, 0), (3, 1, 2, 1), (1, 0, 1, 0)]:
            banks = {_swizzle((nt * 8 + 2 * (lane % 4) + e) * COLS + warp * 8 + 64 * j + 256 * h + lane // 4) % 32
                     for lane in range(32)}
            assert len(banks) == 32
    for base in range(0, 224, 8):  # a last-pass float4 load: 8 lanes, 8 different 16-byte chunks
        for q in range(16):
            assert len({(_swizzle(tx * 64 + 4 * q) % 32) // 4 for tx in range(base, base + 8)}) == 8
    assert f * COLS == n


@pytest.mark.parametrize("n,bits,variant", [(4096, 8, {}), (4096, 4, {}), (1024, 8, {}),
                                            (4096, 8, {"stage_codes": True}), (4096, 8, {"rows": 1})])
def test_square_hadamard_quant_builds(n, bits, variant, tmp_path):
    """kernels_tl.hadamard_quant_square: 16-byte loads of the row, the reference's rounding, exactly
    two barriers (after the first register pass, and the token's amax; a third before the staged
    codes' 16-byte stores), no spills."""
    from kernels_tl.hadamard_quant_square import SM90, hadamard_quant_square
    src = hadamard_quant_square(n, bits, 0.9, target=SM90, **variant).get_kernel_source()
    assert_reference_rounding(src)
    assert "*(uint4*)(X + " in src                      # the row's float16 values, 16 bytes a load
    assert re.search(r"\*\(float4\*\)\((\(\(float\*\))?S\)? \+ ", src)  # pass 1's stores, 16 bytes each
    staged = variant.get("stage_codes", False)
    assert src.count("__syncthreads()") == 2 + staged
    assert ("*(int4*)(XQ + " in src) == staged          # staged codes: 16 a store
    assert ptxas_spills(src, tmp_path) == [0, 0]


def test_square_quantizer_layout():
    """The square kernel's shared-memory index is a permutation of each row's E x E block, the
    second pass reads what the first wrote at the same position, and both passes' accesses are
    free of bank conflicts (8 lanes of float4 stores; 32 lanes of float32 loads)."""
    from kernels_tl.hadamard_quant_square import _swizzled, square_fits, square_side
    for e in (32, 64):
        assert sorted(_swizzled(r, c, e) for r in range(e) for c in range(e)) == list(range(e * e))
        for r in range(e):
            for c in range(e):  # the kernel's two forms: pass 1's float4 chunks, pass 2's columns
                assert _swizzled(r, c, e) == r * e + ((c // 4) ^ (r % (e // 4))) * 4 + c % 4
                assert _swizzled(r, c, e) == r * e + (c ^ ((r % (e // 4)) * 4))
        for q in range(e // 4):  # pass 1: lanes r .. r + 7 store chunk q of their rows
            for r0 in range(0, e, 8):
                assert len({(_swizzled(r, 4 * q, e) // 4) % 8 for r in range(r0, r0 + 8)}) == 8
        for u in range(e):  # pass 2: lanes c .. c + 31 load row u
            for c0 in range(0, e, 32):
                assert len({_swizzled(u, c, e) % 32 for c in range(c0, c0 + 32)}) == 32
    assert square_side(4096) == 64 and square_side(1024) == 32 and square_side(14336) is None
    assert square_fits(4096, (4096,), None, False) and not square_fits(4096, (4096,), None, True)
    assert not square_fits(4096, (64, 64), None, False) and not square_fits(3584, (28, 128), None, False)



@pytest.mark.parametrize("residual", ["add", "splitk"])
def test_rmsnorm_quant_with_l2_prefetch_blocks_builds(residual, tmp_path):
    """The decode modes with L2 prefetch blocks (kernels_tl.l2_prefetch): one more argument (the
    bytes to prefetch), the norm's rows in the blocks below m and the prefetch pieces in the blocks
    past it, one cp.async.bulk.prefetch.L2 a piece; every block waits for the previous kernel."""
    from kernels_tl.quantize import SM90, rmsnorm_quant
    src = rmsnorm_quant(64 + 4096, 64, 4096, 4, 0.9, 1e-5, target=SM90, threads=512, residual=residual,
                        prefetch_blocks=132).get_kernel_source()
    assert_reference_rounding(src)
    assert re.search(r"uchar\* (__restrict__ )?PF\b", src)
    body = src[src.index("main_kernel("):]
    assert "cp.async.bulk.prefetch.L2.global" in src and body.count("quad_prefetch_l2(") == 1
    assert body.index("cudaGridDependencySynchronize()") < body.index("if (((int)blockIdx.x) < m)")
    assert src.count("__syncthreads()") == 2
    assert ptxas_spills(src, tmp_path) == [0, 0]
    plain = rmsnorm_quant(64 + 4096, 64, 4096, 4, 0.9, 1e-5, target=SM90, threads=512,
                          residual=residual).get_kernel_source()
    assert "quad_prefetch_l2" not in plain and not re.search(r"\bPF\b", plain)


def test_l2_prefetch_rides_only_in_the_fused_add_modes():
    from kernels_tl.quantize import SM90, rmsnorm_quant
    with pytest.raises(AssertionError, match="fused-add"):
        rmsnorm_quant(64 + 4096, 64, 4096, 4, 0.9, 1e-5, target=SM90, residual="float32", prefetch_blocks=8)


def test_l2_prefetch_kernel_builds(tmp_path):
    """The prefetch as a kernel of its own (the o_proj and down_proj sites): waits for the previous
    kernel, lets the next launch, one cp.async.bulk.prefetch.L2 a piece, no stores."""
    from kernels_tl.l2_prefetch import SM90, l2_prefetch_kernel
    src = l2_prefetch_kernel(132, target=SM90).get_kernel_source()
    body = src[src.index("main_kernel("):]
    assert body.index("cudaGridDependencySynchronize()") < body.index("cudaTriggerProgrammaticLaunchCompletion()")
    assert body.count("quad_prefetch_l2(") == 1 and "cp.async.bulk.prefetch.L2.global" in src
    assert not re.search(r"PF\[[^]]*\] =", body)
    assert ptxas_spills(src, tmp_path) == [0, 0]
