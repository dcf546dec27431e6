"""Every TileLang kernel builds for sm_90a without a GPU, and the GEMMs' integer part runs on wgmma."""

import shutil

import re

import pytest

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)


@pytest.mark.parametrize("rank,bias,block_m", [(64, False, 256), (0, False, 384), (0, False, 256), (32, True, 256)])
def test_prefill_gemm_builds_with_int8_wgmma(rank, bias, block_m):
    from kernels_tl.gemm import SM90, w4ax_gemm
    from kernels_tl.gemm_plans import prefill_candidates
    tiles = next(t for t in prefill_candidates(2048, 1536, rank, bias) if t["block_m"] == block_m)
    kernel = w4ax_gemm(640, 1536, rank, bias, "float16", target=SM90, **tiles)
    src = kernel.get_kernel_source()
    # The unpacked weight tile and the activation tile feed int8 wgmma from shared memory; the
    # outlier slice runs on fp16 wgmma; the weight is unpacked by the word (never per element).
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32" in src
    assert "mma_sync" not in src
    assert ("wgmma_ss<tl::DataType::kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32" in src) == (rank > 0)
    assert "quad_unpack_int4x32(" in src and "fence_proxy_async" in src


@pytest.mark.parametrize("n,k,rank,bias", [(28672, 4096, 0, False), (6144, 4096, 64, False),
                                           (4160, 14336, 0, True), (640, 576, 64, True)])
def test_producer_unpack_prefill_gemm_builds(n, k, rank, bias, tmp_path):
    """kernels_tl.gemm_ws (the prefill GEMM from 1024 tokens): the producer warpgroup issues the TMA of a later
    tile (a prologue loads the first ones), then waits for this tile's bytes, unpacks it and
    signals the consumers, who only wait, multiply on int8 wgmma and free what they read; no block
    barrier between the roles; the stages fit the SM's shared memory; nothing spills (but a few
    bytes in the outlier epilogue)."""
    import re

    from test_quantize_build import ptxas_log

    from kernels_tl.gemm_plans import WS_TILES, fit_k
    from kernels_tl.gemm_ws import SM90, w4ax_gemm_ws
    tiles = fit_k(WS_TILES, k)
    src = w4ax_gemm_ws(n, k, rank, bias, "float16", target=SM90, **tiles).get_kernel_source()
    producer, consumer = src.split("if (256 <= ((int)threadIdx.x)) {")[1].split("if (((int)threadIdx.x) < 256) {")
    assert "warpgroup_reg_dealloc<40>" in producer and "warpgroup_reg_alloc<232>" in consumer
    prologue, loop = producer.split("for (int kt = 0;")
    assert prologue.count("tma_load(") == 2 and loop.count("tma_load(") == 2
    # in the loop: the TMA of a later tile (after the previous tile's unpack), then wait(loaded) ->
    # unpack -> fence -> arrive(unpacked)
    unpack_at = loop.index("quad_unpack_int4x32(")
    assert loop.index("tma_load(") < loop.rindex(".wait(", 0, unpack_at) < unpack_at
    assert unpack_at < loop.index("fence_proxy_async") < loop.index(".arrive()", unpack_at)
    # The roles meet only at their barriers: a __syncthreads between the two branches (TileLang's
    # storage sync inserts one for some orders of the producer's loop) would deadlock them.
    assert src.count("__syncthreads") == 1 and src.index("__syncthreads") < src.index("if (256 <= ((int)threadIdx.x))")
    body = consumer.split("for (int kt_1")[1]
    body = body[:body.index("].arrive();")]
    assert "quad_unpack_int4x32(" not in consumer and "__syncthreads" not in body
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32" in body
    assert ("wgmma_ss<tl::DataType::kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32" in consumer) == (rank > 0)
    # each tile's wgmma completes before the consumers free its buffers
    assert "warpgroup_wait<0>" in body
    buffers = {name: int(off) for name, off in re.findall(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\)", src)}
    stages, bk = (3 if rank else 4), tiles["block_k"]
    sizes = {"x_s": stages * 256 * bk, "w_packed": stages * 128 * bk // 2, "w_s": 2 * 128 * bk,
             "xo_s": 256 * 64 * 2, "wo_s": 128 * 64 * 2}
    assert set(buffers) <= set(sizes)
    assert max(off + sizes[name] for name, off in buffers.items()) <= 227 * 1024
    log = ptxas_log(src, tmp_path)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) <= (16 if rank else 0), log[-1500:]


@pytest.mark.parametrize("n,k,rank,bias,tiles", [(28672, 4096, 0, False, {}), (6144, 4096, 64, False, {}),
                                                 (4160, 14336, 0, True, {"num_stages": 3}),
                                                 (28672, 4096, 0, False, {"block_k": 256, "chunk": 128, "num_stages": 2}),
                                                 (960, 576, 64, True, {}), (4160, 4096, 0, False, {"block_t": 128})])
def test_register_unpack_prefill_gemm_builds(n, k, rank, bias, tiles, tmp_path):
    """kernels_tl.gemm_rs (the prefill GEMM above 64 tokens): the int8 wgmma takes the weights from
    registers as its M side (two consumer warpgroups, 64 rows each) and 256 (or 128) tokens from
    shared memory as its N side; no unpacked tile in shared memory; the outlier product on float16
    wgmma with the weights as M; blocks in panels of token tiles where the dispatch asks for them
    (gate_up); the output staged in a padded tile (rows of 136 float16) and stored 16 bytes a
    thread; a weight tile overhanging n (4160) stores no row past it; the tiles fit and nothing
    spills. The
    outlier tiles are loaded by the consumers' cp.async before the roles split (the producer is
    threads 0..127) and waited for, fenced and barriered after the K loop, before their wgmma."""
    from test_quantize_build import ptxas_spills

    from kernels_tl.gemm_plans import rs_tiles
    from kernels_tl.gemm_rs import SM90, w4ax_gemm_rs
    tiles = {**rs_tiles(2048, n, k), **tiles}
    src = w4ax_gemm_rs(n, k, rank, bias, "float16", target=SM90, **tiles).get_kernel_source()
    block_t = tiles["block_t"]
    # gate_up's 56 MiB weight runs its blocks in panels of 8 token tiles (L2 reuse of weight tiles)
    assert ("const dim3 blockIdx = tl::rasterization2DRow<8>();" in src) == (n == 28672), n
    assert f"wgmma_rs<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64, {block_t}, 32" in src
    assert "wgmma_ss<tl::DataType::kInt8" not in src and "quad_unpack_int4x32(" not in src
    assert (f"wgmma_ss<tl::DataType::kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32, 64, {block_t}" in src) == (rank > 0)
    assert "__launch_bounds__(384, 1)" in src and "warpgroup_reg_alloc<240>" in src
    store = next(line for line in src.splitlines() if "*(uint4*)(Y + " in line)
    assert "* 136)" in store
    guard = src[:src.index("*(uint4*)(Y + ")].rsplit("if (", 1)[1]
    assert (f"< {n // 64})" in guard) == (n % 128 != 0), guard  # the 64-row half tiles within n
    assert re.search(r"tma_load\(WQ_desc", src) and re.search(r"tma_load\(XQ_desc", src)
    if rank:
        issue, split = src.index("if (128 <= ((int)threadIdx.x))"), src.index("warpgroup_reg_dealloc")
        assert issue < src.index("quad_cp_async16_zfill((&") < src.index("quad_cp_async_commit();") < split
        assert split < src.index("quad_cp_async_ready(256);") < src.index("wgmma_ss<tl::DataType::kFloat16")
    # the tile's scales: cp.async before the roles split, then read from shared memory only
    split, ready = src.index("warpgroup_reg_dealloc"), src.index("quad_cp_async_ready(256);")
    assert src.index("quad_cp_async16_bytes((&") < split < ready and "XS[" not in src[ready:]
    assert max(ptxas_spills(src, tmp_path)) == 0


@pytest.mark.parametrize("n,k,rank,block_t", [(28672, 4096, 64, 256), (3072, 576, 64, 128), (37888, 3584, 0, 256)])
def test_register_unpack_prefill_gemm_builds_with_the_swiglu_epilogue(n, k, rank, block_t, tmp_path):
    """gemm_rs with swiglu (QUAD_FUSED_SWIGLU): a tile's packed weights come as two copies, the gate
    rows and the up rows n / 2 further; y is n / 2 wide, computed from the staged float16 gemm
    output with the approximate silu and stored 16 bytes a thread; at most a few bytes spill."""
    from test_quantize_build import ptxas_spills

    from kernels_tl.gemm_plans import RS_TILES, fit_k
    from kernels_tl.gemm_rs import SM90, w4ax_gemm_rs
    tiles = {**fit_k(RS_TILES, k), "block_t": block_t}
    src = w4ax_gemm_rs(n, k, rank, False, "float16", **tiles, swiglu=True, fast_silu=True, target=SM90).get_kernel_source()
    loads = re.findall(r"tma_load\(WQ_desc, [^;]*", src)
    assert len(loads) == 2 and loads[1].endswith(f" + {n // 2}))"), loads
    assert "fast_rcp(" in src and "__expf(" in src
    store = next(line for line in src.splitlines() if "*(uint4*)(Y + " in line)
    assert f"* (int64_t){n // 2})" in store  # rows of y are n / 2 wide
    assert max(ptxas_spills(src, tmp_path)) <= 16


@pytest.mark.parametrize("n,k,m,rank", [(28672, 4096, 32, 0), (6144, 4096, 16, 64), (28672, 4096, 64, 64)])
def test_producer_unpack_decode_gemm_builds(n, k, m, rank, tmp_path):
    """gemm_ws.w4ax_gemm_decode_ws (decode GEMMs of several waves, gate_up): a producer warpgroup that loads and
    unpacks, one consumer warpgroup with the weights as the wgmma M side and the fused epilogue; no
    block barrier between the roles; up to 32 tokens two blocks fit a SM (shared memory,
    registers); no spills."""
    import re

    from test_quantize_build import ptxas_log

    from kernels_tl.gemm_plans import DECODE_WS_TILES, decode_plan
    from kernels_tl.gemm_ws import SM90, w4ax_gemm_decode_ws
    block_m = decode_plan(m, n, k)["block_m"]
    tiles = DECODE_WS_TILES
    src = w4ax_gemm_decode_ws(n, k, rank, True, "float16", block_m, target=SM90, **tiles).get_kernel_source()
    producer, consumer = src.split("if (128 <= ((int)threadIdx.x)) {")[1].split("if (((int)threadIdx.x) < 128) {")
    assert "quad_unpack_int4x32(" in producer and "tma_load(" in producer and "quad_unpack_int4x32(" not in consumer
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in consumer
    assert src.count("__syncthreads") == 1 and src.index("__syncthreads") < src.index("if (128 <= ((int)threadIdx.x))")
    assert "__launch_bounds__(256, 2)" in src
    ends = [int(off) for off in re.findall(r"buf_dyn_shmem \+ (\d+)\)", src)]
    x_tiles = tiles["num_stages"] * block_m * tiles["block_k"]
    # x_s is placed last; 1 KB a block is reserved. Up to 32 tokens two blocks fit a SM.
    assert max(ends) + x_tiles <= (227 * 1024 // 2 - 1024 if block_m <= 32 else 227 * 1024)
    log = ptxas_log(src, tmp_path)
    assert int(re.search(r"Used (\d+) registers", log).group(1)) <= 128
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log)


@pytest.mark.parametrize("n,k,m,rank", [(6144, 4096, 32, 64), (28672, 4096, 16, 0), (4160, 4096, 64, 64)])
def test_decode_gemm_with_fused_epilogue_builds(n, k, m, rank):
    """Split-1 decode problems run one kernel: int8 wgmma for the integer part, float16 wgmma for
    the outlier product, no workspace atomics."""
    from kernels_tl.gemm_decode import SM90, w4ax_gemm_decode
    from kernels_tl.gemm_plans import decode_plan
    plan = decode_plan(m, n, k)
    if n == 4160:  # 65 weight tiles do not fill the GPU: this one is split, so not this kernel
        assert plan["split"] > 1
        return
    assert plan["split"] == 1
    src = w4ax_gemm_decode(n, k, rank, True, "float16", plan["block_m"], plan["block_k"], plan["num_stages"],
                           target=SM90).get_kernel_source()
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    assert ("kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32, 64" in src) == (rank > 0)
    assert "AtomicAdd" not in src


@pytest.mark.parametrize("n,k,m,rank", [(6144, 4096, 32, 64), (28672, 4096, 16, 0), (4160, 4096, 32, 0),
                                         (4160, 14336, 64, 0), (640, 576, 9, 64)])
def test_decode_gemm_unpacks_the_weights_in_registers(n, k, m, rank, tmp_path):
    """The dispatch's decode GEMMs (QUAD_DECODE_GEMM=rs, the default), fused or split-K: the int8
    wgmma takes the weights from registers (no unpacked tile in shared memory, no word-unpack
    helper), the packed tile it reads them from is swizzled (a warp's eight rows in different
    banks: the unswizzled form read them 8-way conflicted), and nothing spills."""
    import re
    from test_quantize_build import ptxas_spills
    from kernels_tl import gemm_dispatch
    from kernels_tl.targets import SM90
    spec = gemm_dispatch.kernel_specs(m, n, k, rank, False, "float16")[0]
    builder, args, kwargs = spec
    assert dict(kwargs)["register_unpack"] is True
    src = builder(*args, **dict(kwargs), target=SM90).get_kernel_source()
    assert "wgmma_rs<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    assert "wgmma_ss<tl::DataType::kInt8" not in src and "quad_unpack_int4x32(" not in src
    # the packed bytes' shared-memory read: the 16-byte column is XORed with the row (swizzle)
    load = next(line for line in src.splitlines() if "w_packed_local_cast + 0) = " in line)
    assert re.search(r"\) & 1\) \* 16\)", load), load
    assert max(ptxas_spills(src, tmp_path)) == 0


# (at 64 tokens the K tiles are one 256-wide chunk: nothing to overlap, one fragment)
@pytest.mark.parametrize("n,k,m,rank", [(6144, 4096, 32, 64), (28672, 4096, 16, 0), (4160, 14336, 32, 0)])
def test_decode_gemm_overlaps_the_register_unpack_with_the_wgmmas(n, k, m, rank, tmp_path):
    """The dispatch's decode GEMMs: two weight fragments; after a chunk's wgmmas are issued only the
    group before them is waited for (wait_wgmma<1>) before the other fragment is rewritten, and the
    activation stage is released only after the tile's last wgmma completed (warpgroup_wait<0>
    before its arrive: the copy engine refills that stage next)."""
    from test_quantize_build import ptxas_spills
    from kernels_tl import gemm_dispatch
    from kernels_tl.targets import SM90
    builder, args, kwargs = gemm_dispatch.kernel_specs(m, n, k, rank, False, "float16")[0]
    assert dict(kwargs)["overlap_unpack"] is True
    src = builder(*args, **dict(kwargs), target=SM90).get_kernel_source()
    assert "wgmma_rs<tl::DataType::kInt8" in src and "signed char f1[128]" in src
    body = src[src.index("for (int kt_1"):]  # the consumer's K loop (the producer's is kt)
    # barrier events in order: a stage's full barrier (waited on) is indexed by the stage alone,
    # its empty barriers (arrived on) by the stage plus an offset
    events = [e.group(0) if e.group(1) is None else
              "arrive" if e.group(2) == "arrive" else "full" if "+" not in e.group(1) else "empty"
              for e in re.finditer(r"mbarrier\[([^\]]*)\]\.(wait|arrive)\(|wait_wgmma<\d>|warpgroup_wait<0>", body)]
    # chunk 1 is unpacked after chunk 0's wgmmas were issued, which came after the activations landed
    assert events.index("full") < events.index("wait_wgmma<1>")
    arrives = [i for i, e in enumerate(events) if e == "arrive"]
    assert len(arrives) == 2 and "warpgroup_wait<0>" in events[arrives[0]:arrives[1] + 1]
    assert max(ptxas_spills(src, tmp_path)) == 0


@pytest.mark.parametrize("n,k,m", [(28672, 4096, 16), (28672, 4096, 32), (6144, 4096, 64), (4160, 14336, 32)])
def test_resident_decode_gemm_keeps_its_producer_and_fits_two_blocks(n, k, m, tmp_path):
    """The decode GEMMs, two blocks a SM: the TMA producer stays (warp specialization), setmaxnreg
    is gone and __launch_bounds__(256, 2) holds each thread to 128 registers without spills."""
    from test_quantize_build import ptxas_log
    from kernels_tl import gemm_dispatch
    from kernels_tl.targets import SM90
    builder, args, kwargs = gemm_dispatch.kernel_specs(m, n, k, 64 if n != 4160 else 0, False, "float16")[0]
    assert dict(kwargs)["ws_blocks"] == 2
    src = builder(*args, **dict(kwargs), target=SM90).get_kernel_source()
    assert "__launch_bounds__(256, 2)" in src and "tma_load" in src and "warpgroup_reg_alloc" not in src
    log = ptxas_log(src, tmp_path)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 128 and "0 bytes spill stores" in log


@pytest.mark.parametrize("n,k,m", [(4160, 4096, 1), (6144, 4096, 16), (640, 1536, 64), (960, 576, 3)])
def test_decode_gemm_builds_with_split_k(n, k, m):
    from kernels_tl.gemm_decode import SM90, w4ax_epilogue, w4ax_gemm_splitk
    from kernels_tl.gemm_plans import decode_plan
    plan = decode_plan(m, n, k)
    src = w4ax_gemm_splitk(n, k, **plan, target=SM90).get_kernel_source()
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    assert "AtomicAdd" in src
    if k >= 4096:  # Llama-sized problems are split along K until the grid fills most SMs
        assert n // 64 * plan["split"] >= 0.7 * 132
    epilogue = w4ax_epilogue(n, 64, True, "float16", plan["block_m"], target=SM90).get_kernel_source()
    assert "kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32" in epilogue  # outlier product on tensor cores


@pytest.mark.parametrize("min_blocks", [2, 3])
@pytest.mark.parametrize("n,k,m,rank", [(28672, 4096, 32, 0), (4160, 4096, 32, 64), (6144, 4096, 16, 64),
                                        (4160, 14336, 40, 0)])
def test_decode_gemm_builds_for_several_blocks_a_sm(n, k, m, rank, min_blocks, tmp_path):
    """QUAD_DECODE_GEMM_BLOCKS=2 / 3: the decode kernels without warp specialization (no setmaxnreg:
    a cp.async pipeline issued by all threads), __launch_bounds__(128, min_blocks) capping registers
    without spills, and tiles whose shared memory fits min_blocks blocks a SM."""
    import re

    from test_quantize_build import ptxas_log

    from kernels_tl.gemm_decode import SM90, w4ax_epilogue, w4ax_gemm_decode, w4ax_gemm_splitk
    from kernels_tl.gemm_plans import SMEM_PER_SM, decode_plan, decode_smem
    plan = decode_plan(m, n, k, min_blocks=min_blocks)
    if "min_blocks" not in plan:  # no K tile fits: 64-token tiles at 3 blocks a SM keep the default kernel
        assert (plan["block_m"], min_blocks) == (64, 3)
        return
    assert plan["min_blocks"] == min_blocks
    assert decode_smem(plan["block_m"], plan["block_k"], plan["num_stages"]) * min_blocks <= SMEM_PER_SM
    if plan["split"] == 1:
        src = w4ax_gemm_decode(n, k, rank, False, "float16", plan["block_m"], plan["block_k"], plan["num_stages"],
                               target=SM90, min_blocks=min_blocks).get_kernel_source()
    else:
        src = w4ax_gemm_splitk(n, k, **plan, target=SM90).get_kernel_source()
        assert "AtomicAdd" in src
        w4ax_epilogue(n, rank, False, "float16", plan["block_m"], target=SM90)
    assert f"__launch_bounds__(128, {min_blocks})" in src
    assert "setmaxnreg" not in src and "warpgroup_reg_alloc" not in src and "cp_async" in src
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    log = ptxas_log(src, tmp_path)
    assert int(re.search(r"Used (\d+) registers", log).group(1)) <= 65536 // (128 * min_blocks)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log)
    used = re.search(r"(\d+) bytes smem", log)
    assert used is None or int(used.group(1)) * min_blocks <= SMEM_PER_SM  # static part; the tiles are dynamic


@pytest.mark.parametrize("tokens,rank", [(1, 0), (4, 64)])
def test_gemv_builds_on_dp4a_without_spills(tokens, rank):
    from kernels_tl.gemv import SM90, w4ax_gemv
    src = w4ax_gemv(4160, 4096, rank, True, "float16", tokens, target=SM90).get_kernel_source()
    assert "__dp4a(" in src and "warp_reduce_sum" in src


@pytest.mark.parametrize("m", [5, 64])
def test_int8_weight_decode_gemm_builds(m):
    """The int8 lm_head's decode GEMM (weight_bits 8): int8 weight tiles straight to wgmma, no unpack."""
    from kernels_tl.gemm_decode import SM90, w4ax_gemm_decode
    from kernels_tl.gemm_dispatch import w8a8_decode_supports
    from kernels_tl.gemm_plans import decode_plan
    n, k, r = 128256, 4096, 64
    assert w8a8_decode_supports(n, k, r)
    plan = decode_plan(m, n, k)
    src = w4ax_gemm_decode(n, k, r, False, "float32", plan["block_m"], plan["block_k"], plan["num_stages"], 8,
                           target=SM90).get_kernel_source()
    assert "wgmma_ss<tl::DataType::kInt8, tl::DataType::kInt8, tl::DataType::kInt32, 64" in src
    assert "quad_unpack" not in src and "kFloat16, tl::DataType::kFloat16, tl::DataType::kFloat32" in src
