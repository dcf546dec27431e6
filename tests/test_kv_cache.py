"""Paged int4 KV cache: reference numerics, slot mapping and block tables on the CPU; the kernels build for sm_90a."""

import re
import shutil

import pytest
import torch

from kernels_tl import reference as ref

BLOCK = 4


def empty_cache(num_blocks, kv_heads, head_dim, block=BLOCK):
    return (torch.zeros(num_blocks, kv_heads, block, head_dim // 2, dtype=torch.uint8),
            torch.zeros(num_blocks, kv_heads, block, 2, dtype=torch.float16))


def test_pack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (5, 3, 8), dtype=torch.uint8)
    packed = ref.pack_kv(q)
    assert torch.equal(ref.unpack_kv(packed), q)
    assert int(packed[0, 0, 0]) == int(q[0, 0, 0]) | int(q[0, 0, 1]) << 4  # low nibble = even element


def test_quantize_kv_stores_a_float16_scale_and_bounded_error():
    x = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 32)
    q, scale, zero = ref.quantize_kv(x, 4)
    assert torch.equal(scale, scale.half().float()) and zero.min() >= 0 and zero.max() <= 15
    err = (ref.dequantize_kv(q, scale, zero) - x).abs()
    # Half a step, plus at most 15 * 2^-11 steps where float16 rounding shrank the scale.
    assert (err <= scale * (0.5 + 15 * 2.0 ** -11) + 1e-6).all()


def test_store_then_gather_follows_the_block_table():
    torch.manual_seed(0)
    kv_heads, dim, n = 2, 8, 11
    k, v = torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    table = torch.tensor([5, 2, 7])  # non-contiguous physical blocks
    slots = table[torch.arange(n) // BLOCK] * BLOCK + torch.arange(n) % BLOCK
    kd, km = empty_cache(8, kv_heads, dim)
    vd, vm = empty_cache(8, kv_heads, dim)
    ref.kv_store(k, v, slots, kd, km, vd, vm)
    assert torch.allclose(ref.gather_kv(kd, km, table, n), ref.fake_quant_kv(k, 4, 1.0))
    assert torch.allclose(ref.gather_kv(vd, vm, table, n), ref.fake_quant_kv(v, 4, 1.0))
    assert not kd[[0, 1, 3, 4, 6]].any()  # blocks outside the table are untouched


def test_padding_slots_are_skipped():
    k = torch.randn(3, 1, 8)
    kd, km = empty_cache(2, 1, 8)
    vd, vm = empty_cache(2, 1, 8)
    ref.kv_store(k, k, torch.tensor([-1, 5, -1]), kd, km, vd, vm)
    written = (km[..., 0] != 0).nonzero().tolist()
    assert written == [[1, 0, 1]]


def test_paged_attention_matches_dense_attention_and_is_causal_for_prefill():
    torch.manual_seed(1)
    heads, kv_heads, dim = 4, 2, 8
    lens, qlens = torch.tensor([9, 5]), torch.tensor([3, 5])
    kd, km = empty_cache(8, kv_heads, dim)
    vd, vm = empty_cache(8, kv_heads, dim)
    tables = torch.tensor([[6, 1, 3], [0, 4, 2]])
    ks, vs = [], []
    for i in range(2):
        k, v = torch.randn(int(lens[i]), kv_heads, dim), torch.randn(int(lens[i]), kv_heads, dim)
        pos = torch.arange(int(lens[i]))
        ref.kv_store(k, v, tables[i][pos // BLOCK] * BLOCK + pos % BLOCK, kd, km, vd, vm)
        ks.append(ref.fake_quant_kv(k, 4, 1.0))
        vs.append(ref.fake_quant_kv(v, 4, 1.0))
    q = torch.randn(int(qlens.sum()), heads, dim)
    out = ref.paged_attention(q, kd, km, vd, vm, tables, lens, qlens)
    start = 0
    for i in range(2):
        n, ctx = int(qlens[i]), int(lens[i])
        qi = q[start:start + n].transpose(0, 1).unsqueeze(0)                       # [1, H, n, D]
        k = ks[i].repeat_interleave(2, 1).transpose(0, 1).unsqueeze(0)
        v = vs[i].repeat_interleave(2, 1).transpose(0, 1).unsqueeze(0)
        mask = torch.arange(ctx).unsqueeze(0) <= torch.arange(ctx - n, ctx).unsqueeze(1)
        want = torch.nn.functional.scaled_dot_product_attention(qi, k, v, attn_mask=mask)
        assert torch.allclose(out[start:start + n], want[0].transpose(0, 1), atol=1e-5)
        start += n


def test_kv_bytes_per_token_are_at_least_3_5x_smaller_than_fp16():
    for dim in (64, 128):
        int4 = dim // 2 + 2 * 2  # packed nibbles + float16 scale and zero
        assert 2 * dim / int4 >= 3.5


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (9, 3, 64), (28, 4, 128)])
def test_kv_kernels_build_for_sm90(heads, kv_heads, dim):
    pytest.importorskip("tilelang")
    from kernels_tl.kv_attention import SM90, attention_combine, attention_decode
    from kernels_tl.kv_store import kv_store
    assert "nearbyintf" in kv_store(kv_heads, dim, target=SM90).get_kernel_source()
    assert "KO[" in kv_store(kv_heads, dim, target=SM90, round_trip=True).get_kernel_source()
    src = attention_decode(heads, kv_heads, dim, 4, target=SM90).get_kernel_source()
    assert re.search(r"\b(wg)?mma", src) and "exp2" in src
    assert attention_combine(heads, dim, 4, target=SM90).get_kernel_source()


def test_prefill_without_prefix_attends_to_its_own_tokens_like_the_cache():
    """kv_ops.paged_attention's shortcut (SDPA over the new K / V with the int4 round trip) equals the
    reference reading the same tokens back from the paged cache."""
    from quad_engine import kv_ops
    torch.manual_seed(3)
    heads, kv_heads, dim, lens = 4, 2, 8, torch.tensor([6, 3])
    k, v, q = torch.randn(9, kv_heads, dim), torch.randn(9, kv_heads, dim), torch.randn(9, heads, dim)
    kd, km = empty_cache(8, kv_heads, dim)
    vd, vm = empty_cache(8, kv_heads, dim)
    tables = torch.tensor([[3, 5], [1, 0]])
    pos = torch.cat([torch.arange(6), torch.arange(3)])
    seq = torch.tensor([0] * 6 + [1] * 3)
    # The engine's numerics: the cache quantizes float16 K / V, attention reads float16 Q.
    cache = (kd, km, vd, vm)
    new_kv = kv_ops.kv_store(k, v, tables[seq, pos // BLOCK] * BLOCK + pos % BLOCK, cache, 1.0, round_trip=True)
    fast = kv_ops.paged_attention(q, cache, tables, lens, lens, True, new_kv)
    slow = ref.paged_attention(q.half().float(), kd, km, vd, vm, tables, lens, lens)
    assert fast.dtype == torch.float16
    assert torch.allclose(fast.float(), slow, atol=1e-3, rtol=0)


def test_batched_fp16_decode_attention_equals_the_reference():
    from quad_engine import kv_ops
    torch.manual_seed(4)
    heads, kv_heads, dim = 4, 2, 8
    k_cache, v_cache = torch.randn(8, kv_heads, BLOCK, dim), torch.randn(8, kv_heads, BLOCK, dim)
    tables, lens = torch.tensor([[6, 1, 3], [0, 4, 0]]), torch.tensor([9, 5])
    q = torch.randn(2, heads, dim)
    fast = kv_ops.paged_attention_fp16(q, (k_cache, v_cache), tables, lens, torch.ones(2, dtype=torch.long))
    slow = ref.paged_attention_fp16(q, k_cache, v_cache, tables, lens)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_prefill_tiles_cover_every_new_token_once():
    from kernels_tl.attention_prefill import prefill_tiles, tokens_per_tile
    assert tokens_per_tile(32, 8) == 16 and tokens_per_tile(9, 3) == 21 and tokens_per_tile(28, 4) == 9
    lens = [37, 1, 0, 16]
    tiles = prefill_tiles(torch.tensor(lens), 16)
    assert tiles.dtype == torch.int32
    assert tiles.tolist() == [[0, 0], [0, 16], [0, 32], [1, 0], [3, 0]]
    covered = sorted((int(s), int(t0) + i) for s, t0 in tiles for i in range(16) if int(t0) + i < lens[int(s)])
    assert covered == [(s, i) for s, n in enumerate(lens) for i in range(n)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (9, 3, 64), (28, 4, 128)])
def test_prefill_attention_builds_for_sm90(heads, kv_heads, dim):
    pytest.importorskip("tilelang")
    from kernels_tl.attention_prefill import SM90, attention_prefill
    src = attention_prefill(heads, kv_heads, dim, target=SM90).get_kernel_source()
    assert re.search(r"\b(wg)?mma", src) and "exp2" in src
    assert "tma_load" in attention_prefill(heads, kv_heads, dim, target=SM90, num_stages=2).get_kernel_source()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_pipelined_decode_attention_builds_with_the_copy_engine():
    """The num_stages > 1 variant: K / V tiles by TMA into a warp-specialized pipeline; the default
    loop stays the plain one the engine runs."""
    pytest.importorskip("tilelang")
    from kernels_tl.kv_attention import SM90, attention_decode
    piped = attention_decode(32, 8, 128, 4, target=SM90, num_stages=2).get_kernel_source()
    assert "tma_load" in piped and re.search(r"\b(wg)?mma", piped)
    assert "tma_load" not in attention_decode(32, 8, 128, 4, target=SM90).get_kernel_source()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (9, 3, 64)])
def test_prefetch_decode_attention_builds(heads, kv_heads, dim):
    """The register-prefetch variant: packed K / V loaded by each thread (16-byte loads), dequantized
    from registers into the float16 tiles, no packed tiles in shared memory."""
    pytest.importorskip("tilelang")
    from kernels_tl.kv_attention import SM90, attention_decode
    src = attention_decode(heads, kv_heads, dim, 4, target=SM90, prefetch=True).get_kernel_source()
    assert "quad_kv_dequant8(" in src and re.search(r"\b(wg)?mma", src)
    assert "kp_s" not in src and "vp_s" not in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_prefetch_decode_attention_fits_five_programs_a_sm_when_capped(tmp_path):
    """Capped at 5 blocks per SM, the prefetch loop (Llama-3-8B shapes) builds within 65536 / (5 · 128)
    registers a thread without spills, and its shared memory (no packed tiles) leaves room for 5."""
    pytest.importorskip("tilelang")
    from test_quantize_build import ptxas_log

    from kernels_tl.kv_attention import SM90, attention_decode
    src = attention_decode(32, 8, 128, 2, target=SM90, prefetch=True, min_blocks=5).get_kernel_source()
    assert "__launch_bounds__(128, 5)" in src
    log = ptxas_log(src, tmp_path)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    assert registers <= 65536 // (5 * 128)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log)
    # Dynamic shared memory: the last buffer's offset plus at most its size (a reduction workspace).
    offsets = [int(v) for v in re.findall(r"buf_dyn_shmem \+ (\d+)\)", src)]
    assert max(offsets) + 4096 <= 228 * 1024 // 5 - 1024  # 1 KB a block is reserved by the hardware


def test_decode_splits_fill_the_gpu_down_to_one_cache_block_each(monkeypatch):
    """Batch 1 at a 1152-token table: one 64-token block a split (18), capped at 32 splits for long
    tables; dense batches get the grid's share (2 at batch 32 x 8 kv heads); QUAD_DECODE_SPLIT_BLOCKS
    raises the floor (two blocks: 9)."""
    pytest.importorskip("tilelang")
    from kernels_tl import kv_attention
    monkeypatch.setattr(kv_attention, "DECODE_SPLIT_BLOCKS", 1)
    monkeypatch.setattr(kv_attention, "DECODE_FILL", 2)
    assert kv_attention.decode_splits(1, 8, 1152) == 18
    assert kv_attention.decode_splits(1, 8, 8192) == 32
    assert kv_attention.decode_splits(32, 8, 1152) == 2
    assert kv_attention.decode_splits(1, 8, 1152, min_blocks=2) == 9


def test_decode_attention_caps_the_prefetch_loop_by_grid_density(monkeypatch):
    """The register-prefetch loop capped at 4 blocks a SM wins on grids of up to 3 programs per SM,
    at 5 above (bench/results/attention_h200_2026-11-30c.json): the engine's batch sizes fall on
    either side. The switches override both choices."""
    pytest.importorskip("tilelang")
    from kernels_tl import kv_attention
    monkeypatch.setattr(kv_attention, "DECODE_PREFETCH", None)
    monkeypatch.setattr(kv_attention, "DECODE_MIN_BLOCKS", None)
    splits = kv_attention.decode_splits
    assert kv_attention.decode_loop(1, 8, splits(1, 8, 4096)) == (True, 4)     # 8 x 32 = 256 programs
    assert kv_attention.decode_loop(16, 8, splits(16, 8, 4096)) == (True, 4)   # 16 x 8 x 3 = 384
    assert kv_attention.decode_loop(32, 8, splits(32, 8, 4096)) == (True, 5)   # 32 x 8 x 2 = 512
    assert kv_attention.decode_loop(64, 8, splits(64, 8, 4096)) == (True, 5)   # 64 x 8 = 512
    monkeypatch.setattr(kv_attention, "DECODE_MIN_BLOCKS", 1)
    assert kv_attention.decode_loop(64, 8, 1) == (True, 1)
    monkeypatch.setattr(kv_attention, "DECODE_PREFETCH", False)
    assert kv_attention.decode_loop(1, 8, 32) == (False, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("rows,threads,prefetch", [(64, 128, True), (128, 256, False), (128, 256, True)])
def test_prefill_attention_variants_build_without_spills(rows, threads, prefetch, tmp_path):
    """The prefill kernel's register-prefetch loop (the decode kernel's dequantization from
    registers) and its 128-row programs (each K / V tile dequantized for twice the queries) build
    for sm_90a without spills (Llama-3-8B shapes)."""
    pytest.importorskip("tilelang")
    from test_quantize_build import ptxas_log

    from kernels_tl.attention_prefill import SM90, attention_prefill
    src = attention_prefill(32, 8, 128, target=SM90, rows=rows, threads=threads, prefetch=prefetch).get_kernel_source()
    assert ("quad_kv_dequant8(" in src) == prefetch and ("kp_s" in src) != prefetch
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", ptxas_log(src, tmp_path))


@pytest.mark.parametrize("query_lens,prefix_lens", [([37, 100, 1, 64], [70, 0, 200, 64]), ([5, 130], [0, 3])])
def test_prefill_attention_through_sdpa_over_the_dequantized_cache_matches_reference(query_lens, prefix_lens):
    """attention_prefill_sdpa_op (QUAD_PREFILL_ATTENTION=sdpa) on the CPU: each sequence's cache
    dequantized (rounded to float16, as the GPU kernel writes it), SDPA with the causal mask aligned
    to the bottom right, GQA; within 1e-2 of the reference on a non-contiguous block table."""
    from kernels_tl.attention_prefill import attention_prefill_sdpa_op
    g = torch.Generator().manual_seed(sum(query_lens))
    heads, kv_heads, head_dim, block = 8, 2, 64, 64
    lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    width = max(-(-n // block) for n in lens)
    num_blocks = len(lens) * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * width].view(len(lens), width).int()

    def cache():
        data = torch.randint(0, 256, (num_blocks, kv_heads, block, head_dim // 2), generator=g, dtype=torch.uint8)
        meta = torch.stack((torch.rand(num_blocks, kv_heads, block, generator=g) * 0.1 + 0.01,
                            torch.randint(0, 16, (num_blocks, kv_heads, block), generator=g).float()), -1).half()
        return data, meta

    (kd, km), (vd, vm) = cache(), cache()
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).half()
    got = attention_prefill_sdpa_op(q, kd, km, vd, vm, tables, torch.tensor(lens), query_lens)
    want = ref.paged_attention(q.float(), kd, km, vd, vm, tables, torch.tensor(lens), torch.tensor(query_lens))
    assert got.dtype == torch.float16 and got.shape == q.shape
    assert float((got.float() - want).norm() / want.norm()) <= 1e-2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("kv_heads,head_dim", [(8, 128), (3, 64)])
def test_kv_gather_dequant_builds(kv_heads, head_dim):
    """The gather + dequantize kernel behind the flash prefill path: float32 (nibble - zero) · scale,
    one float16 rounding, no fast-math, no per-element bounds checks."""
    pytest.importorskip("tilelang")
    from kernels_tl.kv_dequant import SM90, kv_gather_dequant
    src = kv_gather_dequant(kv_heads, head_dim, 64, target=SM90).get_kernel_source()
    assert "BLOCKS[" in src and "__fdividef" not in src and "num_blocks) && (0 <= blk" not in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("stages,slack", [(1, 0.0), (3, 0.0), (1, 8.0)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (9, 3, 64), (28, 4, 128), (32, 2, 128)])
def test_register_fragment_decode_attention_builds(heads, kv_heads, dim, stages, slack, tmp_path):
    """kv_attention_rf: K and V go from registers into mma.sync (no float16 tiles, no barrier in
    the loop: the barriers merge the warps after it), K and V as centred codes (half2 subtract / fma),
    without spills, and in at most 128 registers a thread (4 programs a SM) for GQA groups up to 8;
    with a ring, each thread's own cp.async copies and waits."""
    pytest.importorskip("tilelang")
    from test_quantize_build import ptxas_log

    from kernels_tl.kv_attention_rf import SM90, attention_decode_rf
    src = attention_decode_rf(heads, kv_heads, dim, 4, target=SM90, stages=stages,
                              rescale_slack=slack).get_kernel_source()
    body = src.split("extern \"C\"")[-1]
    assert "quad_k_frag(" in body and "quad_v_frag(" in body and "mma_sync" in body
    assert "__hsub2(" in src and "__hfma2(" in src
    assert src.index("__syncthreads()") > src.rindex("mma_sync<")  # after the block loop's last mma
    assert ("quad_cp_async" in body) == (stages > 1)
    if stages > 1:
        assert f"quad_cp_wait{stages - 1}();" in src
    assert ("quad_warp_any(" in body) == (slack > 0)  # the lazy rescale's warp-wide decision
    log = ptxas_log(src, tmp_path)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log)
    if heads // kv_heads <= 8:
        assert int(re.search(r"Used (\d+) registers", log).group(1)) <= 128


def test_decode_attention_picks_the_register_kernel_only_where_it_applies(monkeypatch):
    from kernels_tl import kv_attention
    monkeypatch.setattr(kv_attention, "DECODE_ATTENTION", "rf")
    assert kv_attention.decode_kernel(32, 8, 128) == "rf" and kv_attention.decode_kernel(9, 3, 64) == "rf"
    assert kv_attention.decode_kernel(64, 2, 128) == "tile"   # a GQA group of 32 rows
    assert kv_attention.decode_kernel(32, 8, 96) == "tile"
    monkeypatch.setattr(kv_attention, "DECODE_ATTENTION", "tile")
    assert kv_attention.decode_kernel(32, 8, 128) == "tile"


def test_register_fragment_ring_only_on_sparse_grids(monkeypatch):
    from kernels_tl import kv_attention
    monkeypatch.setattr(kv_attention, "DECODE_RF_STAGES", None)
    assert kv_attention.decode_rf_stages(1, 8, 32) == 3 and kv_attention.decode_rf_stages(16, 8, 3) == 3
    assert kv_attention.decode_rf_stages(64, 8, 1) == 1 and kv_attention.decode_rf_stages(32, 8, 2) == 1
    monkeypatch.setattr(kv_attention, "DECODE_RF_STAGES", 2)
    assert kv_attention.decode_rf_stages(64, 8, 1) == 2


@pytest.mark.parametrize("kernel", ["rf", "tile"])
def test_prebuild_decode_builds_exactly_what_the_op_calls(monkeypatch, kernel):
    """The engine prebuilds the decode kernels before capturing CUDA graphs; a call whose arguments
    differ in form from the prebuild's misses the lru_cache and compiles inside the capture."""
    import torch

    from kernels_tl import kv_attention, kv_attention_rf
    monkeypatch.setattr(kv_attention, "DECODE_ATTENTION", kernel)
    built, called, recorder = set(), set(), {}

    def fake(name):
        def build(*args, **kwargs):
            key = (name, args, tuple(sorted(kwargs.items())))
            recorder["sink"].add(key)
            return lambda *tensors: None
        return build

    monkeypatch.setattr(kv_attention_rf, "attention_decode_rf", fake("rf"))
    monkeypatch.setattr(kv_attention, "attention_decode", fake("tile"))
    monkeypatch.setattr(kv_attention, "attention_combine", fake("combine"))
    heads, kv_heads, hd = 32, 8, 128
    grids = [(1, 32), (16, 3), (64, 1)]  # sparse and dense grids: the rf ring and register loops
    recorder["sink"] = built
    kv_attention.prebuild_decode(heads, kv_heads, hd, grids, workers=1)
    recorder["sink"] = called
    for batch, splits in grids:
        cache = torch.zeros(4, kv_heads, kv_attention.BLOCK_SIZE, hd // 2, dtype=torch.uint8)
        meta = torch.zeros(4, kv_heads, kv_attention.BLOCK_SIZE, 2, dtype=torch.float16)
        kv_attention.attention_decode_op(torch.zeros(batch, heads, hd, dtype=torch.float16), cache, meta, cache,
                                         meta, torch.zeros(batch, 4, dtype=torch.int32),
                                         torch.ones(batch, dtype=torch.int32), splits)
    assert called == built
    assert {key[1][2] for key in built if key[0] == "combine"} == {key[1][3] for key in built if key[0] == kernel} \
        == {32, 3, 1}
    if kernel == "rf":  # (splits, stages): a ring on the sparse grids, the register loop on the dense one
        assert {(key[1][3], key[1][8]) for key in built if key[0] == "rf"} == {(32, 3), (3, 3), (1, 1)}
