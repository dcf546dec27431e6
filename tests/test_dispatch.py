"""The dispatch layer's choice of kernel per shape and token count, and the prebuilds that compile every
choice ahead of time (CPU: no kernel is built)."""

import pytest

pytest.importorskip("tilelang")


def test_prefill_tiles_avoid_a_half_empty_last_wave():
    from kernels_tl.gemm_plans import prefill_tiles
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
    from kernels_tl import gemm_dispatch, gemm_plans
    built = []
    monkeypatch.setattr(gemm_dispatch, "PREFILL_GEMM", "pipelined")  # QUAD_PREFILL_GEMM=pipelined: tiles by shape
    monkeypatch.setattr(gemm_dispatch, "w4ax_gemm", lambda n, k, rank, bias, dtype, **t: built.append((n, t["block_m"])))
    gemm_dispatch.prebuild([(1024, 4160, 4096, 0, False, "float16"), (1024, 6144, 4096, 64, False, "float16")])
    assert sorted(built) == [(4160, 256), (4160, 384), (6144, 256)]
    for m in range(1024, 9000, 512):  # whatever a prefill of that class picks was built
        assert (4160, gemm_plans.prefill_tiles(m, 4160, 4096)["block_m"]) in built
    specs = []  # the register-unpack kernel (the default): both token tiles under 1024 tokens
    monkeypatch.setattr(gemm_dispatch, "PREFILL_GEMM", "rs")
    monkeypatch.setattr(gemm_dispatch, "_build_all", lambda s, workers=16: specs.extend(s))
    gemm_dispatch.prebuild([(65, 4160, 4096, 0, False, "float16"), (1024, 28672, 4096, 64, False, "float16")])
    for m in range(65, 1024, 37):
        assert gemm_dispatch.kernel_specs(m, 4160, 4096, 0, False, "float16")[0] in specs
    assert gemm_dispatch.kernel_specs(1024, 28672, 4096, 64, False, "float16")[0] in specs and len(specs) == 3


def test_fast_silu_only_in_the_gated_kernels_prefills_run(monkeypatch):
    from kernels_tl import hadamard_quant_dispatch as hq
    calls = []
    record = lambda *a, **kw: calls.append(kw.get("fast_silu", False))  # noqa: E731
    for name in ("hadamard_quant", "hadamard_quant_cluster", "hadamard_quant_stream"):
        monkeypatch.setattr(hq, name, record)
    monkeypatch.setattr(hq, "hadamard_quant_mma", lambda *a, **kw: calls.append(True))  # always the fast silu
    monkeypatch.setattr(hq, "stream_blocks", lambda *a: 264)
    for m in (1, 16, 48, 64, 256, 1024, 2048):
        for gated in (True, False):
            hq.build_choice(hq.kernel_choice(m, 14336, (28, 512), None, gated), 14336, (28, 512), None, 8, 0.9, gated)
            assert calls.pop() == (gated and m >= 256), (m, gated)
    monkeypatch.setattr(hq, "FAST_SILU", False)  # QUAD_FAST_SILU=0
    hq.build_choice(hq.kernel_choice(2048, 14336, (28, 512), None, True), 14336, (28, 512), None, 8, 0.9, True)
    assert calls.pop() is False


def test_hadamard_prebuild_covers_every_kernel_the_op_can_pick(monkeypatch):
    from kernels_tl import hadamard_quant_dispatch as hq
    built = set()
    monkeypatch.setattr(hq, "build_choice", lambda choice, *args: built.add((choice, args[0], args[-1])))
    buckets = [1, 2, 4, 8, 16, 32, 48, 64, 256, 1024, 8192]
    problems = [(14336, (28, 512), None, 8, 0.9, True), (14336, (28, 512), None, 8, 0.9, False),
                (4096, (4096,), None, 8, 0.9, False)]
    for job in hq.prebuild_jobs(problems, buckets):
        job()
    for m in buckets:  # whatever the op picks at a bucket's token count was built
        for n, factors, _, _, _, gated in problems:
            assert (hq.kernel_choice(m, n, factors, None, gated), n, gated) in built
    # 14336 (a 28-point dense factor): 8- and 4-block clusters, one 512-thread block a token up to
    # 64 tokens, the default shape above, streaming blocks with the dense factor on the tensor
    # cores for the gated row from 512 tokens; 4096 (no dense factor): one kernel for every count.
    few = {("cluster", 8, 256), ("cluster", 4, 512), ("cluster", 4, 256), ("few",), ("default",)}
    assert {c for c, n, g in built if n == 14336 and g} == few | {("mma",)}
    assert {c for c, n, g in built if n == 14336 and not g} == few
    assert {c for c, n, _ in built if n == 4096} == {("default",)}


def test_hadamard_dispatch_streams_only_wide_gated_rows_of_a_prefill():
    from kernels_tl import hadamard_quant_dispatch as hq
    assert hq.kernel_choice(hq.STREAM_MIN_TOKENS, 14336, (28, 512), None, True) == ("mma",)
    assert hq.kernel_choice(8192, 14336, (28, 512), None, True) == ("mma",)
    assert hq.kernel_choice(hq.STREAM_MIN_TOKENS - 1, 14336, (28, 512), None, True) == ("default",)
    # Plain rows stream slower than the default; Qwen2.5-7B's gated 18944 (a 148-point factor) does
    # not fit twice a SM; narrow rows (SmolLM2's 1536) keep enough one-block rows in flight.
    assert hq.kernel_choice(8192, 14336, (28, 512), None, False) == ("default",)
    assert hq.kernel_choice(8192, 18944, (148, 128), None, True) == ("default",)
    assert hq.kernel_choice(8192, 1536, (12, 128), None, True) == ("default",)
    assert hq.kernel_choice(8192, 4096, (4096,), None) == ("default",)


def test_square_hadamard_kernel_takes_square_plain_rows_only_when_switched_on(monkeypatch):
    """QUAD_HADAMARD_SQUARE_MIN (off by default, not yet measured on a GPU): from that many tokens
    the o_proj input's 4096-wide row runs the two-pass kernel; gated rows, rows with a dense factor
    and block-diagonal Hadamards keep their kernels."""
    from kernels_tl import hadamard_quant_dispatch as hq
    assert hq.SQUARE_MIN_TOKENS == 0 and hq.kernel_choice(2048, 4096, (4096,), None) == ("default",)
    monkeypatch.setattr(hq, "SQUARE_MIN_TOKENS", 65)
    assert hq.kernel_choice(2048, 4096, (4096,), None) == ("square",)
    assert hq.kernel_choice(65, 1024, (1024,), None) == ("square",)
    assert hq.kernel_choice(64, 4096, (4096,), None) == ("default",)
    assert hq.kernel_choice(2048, 14336, (28, 512), None, True) == ("mma",)
    assert hq.kernel_choice(2048, 3584, (28, 128), None) == ("default",)
    assert hq.kernel_choice(2048, 8192, (4096,), 4096) == ("default",)  # block-diagonal: not one square row


def test_hadamard_stream_switch_is_read_from_the_environment(monkeypatch):
    import importlib

    from kernels_tl import hadamard_quant_dispatch as hq

    def gated_choice_with(switch: str, value: str) -> tuple:
        """kernel_choice for the gated 14336-wide row at 8192 tokens, the module read with switch set."""
        monkeypatch.setenv(switch, value)
        try:
            return importlib.reload(hq).kernel_choice(8192, 14336, (28, 512), None, True)
        finally:
            monkeypatch.delenv(switch)
            importlib.reload(hq)

    assert gated_choice_with("QUAD_HADAMARD_STREAM_MIN", "0") == ("default",)
    assert hq.kernel_choice(8192, 14336, (28, 512), None, True) == ("mma",)
    assert gated_choice_with("QUAD_HADAMARD_MMA", "0") == ("stream",)


def test_engine_quantizer_prebuild_uses_the_model_sites(monkeypatch):
    from types import SimpleNamespace

    from kernels_tl import hadamard_quant_dispatch, quantize
    from quad_engine import ops
    from quad_engine.config import HadamardSpec
    norms, problems = [], []
    monkeypatch.setattr(quantize, "rmsnorm_quant", lambda *a, **kw: norms.append((a, kw["residual"], kw["threads"])))
    monkeypatch.setattr(hadamard_quant_dispatch, "prebuild_jobs", lambda probs, counts: problems.extend(probs) or [])
    cfg = SimpleNamespace(act_bits={"qkv": 4, "gate_up": 4, "o": 8, "down": 8}, rank=64, hidden_size=4096,
                          act_clip=0.9, rms_norm_eps=1e-5,
                          hadamard_o=HadamardSpec(size=4096, factors=[4096], block=None),
                          hadamard_down=HadamardSpec(size=14336, factors=[28, 512], block=None))
    ops.prebuild_quantizers(cfg, [1, 8, 2048])
    assert {mode for _, mode, _ in norms} == {"float16", "float32", "add", "splitk"}
    assert {a[:4] for a, _, _ in norms} == {(4160, 64, 4096, 4)}
    # decode sizes take quantize.DECODE_THREADS, the prefill size the width rule (None)
    assert {t for _, _, t in norms} == {quantize.DECODE_THREADS, None}
    assert sorted(problems, key=repr) == sorted([(4096, (4096,), None, 8, 0.9, False),
                                                 (14336, (28, 512), None, 8, 0.9, True)], key=repr)
    norms.clear()
    ops.prebuild_quantizers(cfg, [1, 8], int8_head=True)  # and the final norm of the int8 head
    assert ((4160, 64, 4096, ops.HEAD_BITS, ops.HEAD_CLIP, 1e-5), "add", quantize.DECODE_THREADS) in norms


def test_norm_threads_follow_the_token_count(monkeypatch):
    """The norm runs DECODE_THREADS a block up to DECODE_TOKENS tokens (one block a token, latency
    bound) and the width rule (None) above; QUAD_NORM_DECODE_THREADS=0 keeps the width rule."""
    import importlib

    from kernels_tl import quantize
    assert quantize.DECODE_THREADS == 512
    assert [quantize.norm_threads(m) for m in (1, 32, 64, 65, 2048)] == [512, 512, 512, None, None]
    monkeypatch.setenv("QUAD_NORM_DECODE_THREADS", "0")
    try:
        importlib.reload(quantize)
        assert quantize.norm_threads(1) is None
    finally:
        monkeypatch.delenv("QUAD_NORM_DECODE_THREADS")
        importlib.reload(quantize)


def test_register_unpack_prefill_tiles_follow_the_measured_choices():
    """rs_tiles picks the token tile that was faster in bench/results/gemm_rs_middle_h200_2026-12-02.json
    (128-512 tokens) and gemm_rs_prefill_h200_2026-12-02.json (2048, 8192): 128-token tiles where
    256-token ones would leave SMs idle (o / down at 128-512, qkv at 128-256, gate_up at 128)."""
    from kernels_tl.gemm_plans import rs_tiles
    picks = {(m, n): rs_tiles(m, n, 4096)["block_t"] for m in (128, 256, 512, 2048, 8192)
             for n in (6144, 4160, 28672)}
    assert [picks[(m, 6144)] for m in (128, 256, 512, 2048, 8192)] == [128, 128, 256, 256, 256]  # qkv
    assert [picks[(m, 4160)] for m in (128, 256, 512, 2048, 8192)] == [128, 128, 128, 256, 256]  # o, down
    assert [picks[(m, 28672)] for m in (128, 256, 512, 2048, 8192)] == [128, 256, 256, 256, 256]  # gate_up
    assert rs_tiles(2048, 640, 576)["block_k"] == 64  # K tiles divide SmolLM2's 576


def test_register_unpack_prefill_panels_only_weights_beyond_l2(monkeypatch):
    """Panels of 8 token tiles for the weights that do not fit in L2 (Llama-3-8B's and Qwen2.5-7B's
    gate_up; measured faster in bench/results/sweep_rs_panel_h200_2026-12-03.json), launch order for
    those that do (within noise there); QUAD_RS_PANEL=0 restores launch order everywhere."""
    from kernels_tl import gemm_dispatch, gemm_plans
    panels = {name: gemm_plans.rs_tiles(2048, n, k)["panel"] for name, (n, k) in
              {"qkv": (6144, 4096), "o": (4160, 4096), "gate_up": (28672, 4096), "down": (4160, 14336),
               "qwen gate_up": (37888, 3584), "qwen down": (3648, 18944), "smollm2 gate_up": (3072, 576)}.items()}
    assert panels == {"qkv": 0, "o": 0, "gate_up": 8, "down": 0, "qwen gate_up": 8, "qwen down": 0,
                      "smollm2 gate_up": 0}
    assert all(t["panel"] == 8 for t in gemm_dispatch._rs_tile_class(512, 28672, 4096))
    monkeypatch.setattr(gemm_plans, "RS_PANEL", 0)
    assert gemm_plans.rs_tiles(2048, 28672, 4096)["panel"] == 0


def test_prefill_gemm_is_the_register_unpack_kernel_above_64_tokens(monkeypatch):
    from kernels_tl import gemm_dispatch
    from kernels_tl.gemm import w4ax_gemm
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    from kernels_tl.gemm_ws import w4ax_gemm_ws
    builder, args, kwargs = gemm_dispatch.kernel_specs(2048, 640, 576, 64, True, "float16")[0]
    assert builder is w4ax_gemm_rs and args == (640, 576, 64, True, "float16") and dict(kwargs)["block_k"] == 64
    assert dict(kwargs)["block_t"] == 128 and dict(kwargs)["block_w"] == 128  # 40 tiles of 256 tokens: a third of the SMs
    assert dict(gemm_dispatch.kernel_specs(2048, 4160, 4096, 0, False, "float16")[0][2])["block_t"] == 256
    builder, _, kwargs = gemm_dispatch.kernel_specs(100, 4160, 4096, 0, False, "float16")[0]
    assert builder is w4ax_gemm_rs and dict(kwargs)["block_t"] == 128
    built = []
    monkeypatch.setattr(gemm_dispatch, "_build_all", lambda specs, workers=16: built.extend(specs))
    gemm_dispatch.prebuild([(2048, 4160, 4096, 0, False, "float16")])
    assert built == gemm_dispatch.kernel_specs(4096, 4160, 4096, 0, False, "float16")
    monkeypatch.setattr(gemm_dispatch, "PREFILL_GEMM", "ws")  # QUAD_PREFILL_GEMM=ws
    builder, args, kwargs = gemm_dispatch.kernel_specs(2048, 640, 576, 64, True, "float16")[0]
    assert builder is w4ax_gemm_ws and args == (640, 576, 64, True, "float16") and dict(kwargs)["block_k"] == 64
    monkeypatch.setattr(gemm_dispatch, "PREFILL_GEMM", "pipelined")  # QUAD_PREFILL_GEMM=pipelined
    assert gemm_dispatch.kernel_specs(2048, 4160, 4096, 0, False, "float16")[0][0] is w4ax_gemm


def test_decode_gemms_unpack_in_registers_and_the_switches_restore_the_shared_memory_kernels(monkeypatch):
    from kernels_tl import gemm_dispatch, gemm_plans
    from kernels_tl.gemm_decode import w4ax_epilogue, w4ax_gemm_decode, w4ax_gemm_splitk
    from kernels_tl.gemm_ws import w4ax_gemm_decode_ws
    for m in (5, 16, 32, 64):  # gate_up and qkv: one block covers K, the register-unpack kernel
        for n, rank in ((28672, 0), (6144, 64)):
            builder, args, kwargs = gemm_dispatch.kernel_specs(m, n, 4096, rank, False, "float16")[0]
            assert builder is w4ax_gemm_decode and dict(kwargs)["register_unpack"] is True
            assert args[5] == gemm_plans.decode_plan(m, n, 4096)["block_m"]
    # o_proj's 65 weight tiles are split over K: the split-K kernel (register unpack) and its epilogue
    (splitk, _, kwargs), (epilogue, _, _) = gemm_dispatch.kernel_specs(32, 4160, 4096, 0, False, "float16")
    assert splitk is w4ax_gemm_splitk and dict(kwargs)["register_unpack"] is True and epilogue is w4ax_epilogue
    assert gemm_dispatch.kernel_specs(2, 28672, 4096, 0, False, "float16")[0][0].__name__ == "w4ax_gemv"
    monkeypatch.setattr(gemm_dispatch, "DECODE_GEMM", "ws")  # QUAD_DECODE_GEMM=ws
    for m in (5, 16, 32, 64):  # gate_up, 448 weight tiles: the producer-unpack kernel
        builder, args, _ = gemm_dispatch.kernel_specs(m, 28672, 4096, 0, False, "float16")[0]
        assert builder is w4ax_gemm_decode_ws and args[-1] == gemm_plans.decode_plan(m, 28672, 4096)["block_m"]
    # qkv's 96 tiles (under a wave, measured slower there): the shared-memory pipelined kernel
    builder, _, kwargs = gemm_dispatch.kernel_specs(32, 6144, 4096, 64, False, "float16")[0]
    assert builder is w4ax_gemm_decode and "register_unpack" not in dict(kwargs)
    monkeypatch.setattr(gemm_dispatch, "DECODE_GEMM", "pipelined")  # QUAD_DECODE_GEMM=pipelined
    builder, _, kwargs = gemm_dispatch.kernel_specs(32, 28672, 4096, 0, False, "float16")[0]
    assert builder is w4ax_gemm_decode and "register_unpack" not in dict(kwargs)


def test_resident_decode_plans_fit_two_blocks_a_sm(monkeypatch):
    """Two warp-specialized blocks a SM (the default, QUAD_DECODE_GEMM_RESIDENT=2): K tiles whose
    shared memory fits twice in a SM, the kernel is told (ws_blocks), the K split as for one block
    unless QUAD_DECODE_GEMM_FILL asks for more."""
    from kernels_tl import gemm_plans
    for m in (5, 16, 32, 64):
        for n, k in ((28672, 4096), (6144, 4096), (4160, 14336), (4160, 4096)):
            plan = gemm_plans.decode_plan(m, n, k, resident=2)
            assert plan["ws_blocks"] == 2 and k % (plan["block_k"] * plan["split"]) == 0
            assert 2 * gemm_plans.decode_rs_smem(plan["block_m"], plan["block_k"], plan["num_stages"]) \
                <= gemm_plans.SMEM_PER_SM - 4096
            assert "ws_blocks" not in gemm_plans.decode_plan(m, n, k, resident=1)
    assert gemm_plans.decode_plan(32, 28672, 4096, resident=2)["block_k"] == 512  # 1024 x 2 stages is 136 KB
    assert gemm_plans.decode_plan(32, 4160, 4096, resident=2)["split"] == 2  # 130 blocks
    monkeypatch.setattr(gemm_plans, "DECODE_FILL", 2.0)  # QUAD_DECODE_GEMM_FILL=2
    for m in (16, 32, 64):
        for k in (4096, 14336):  # o, down: 65 tiles x 4 splits, two blocks a SM
            plan = gemm_plans.decode_plan(m, 4160, k, resident=2)
            assert plan["split"] == 4 and k // (plan["block_k"] * 4) >= 2
        assert gemm_plans.decode_plan(m, 28672, 4096, resident=2)["split"] == 1
        assert gemm_plans.decode_plan(m, 6144, 4096, resident=2)["split"] == 1  # 96 tiles fill the SMs unsplit
    assert gemm_plans.decode_plan(16, 4160, 4096, resident=2)["block_k"] == 512  # 1024 would split only twice


def test_resident_switch_reaches_the_register_unpack_kernels_only(monkeypatch):
    from kernels_tl import gemm_dispatch, gemm_plans
    for n, rank in ((28672, 64), (6144, 64), (4160, 0)):
        _, _, kwargs = gemm_dispatch.kernel_specs(32, n, 4096, rank, False, "float16")[0]
        assert dict(kwargs)["ws_blocks"] == 2 and dict(kwargs)["register_unpack"] is True
    monkeypatch.setattr(gemm_dispatch, "DECODE_GEMM", "pipelined")
    _, _, kwargs = gemm_dispatch.kernel_specs(32, 28672, 4096, 64, False, "float16")[0]
    assert "ws_blocks" not in dict(kwargs)
    monkeypatch.setattr(gemm_dispatch, "DECODE_GEMM", "rs")
    monkeypatch.setattr(gemm_plans, "DECODE_RESIDENT", 1)  # QUAD_DECODE_GEMM_RESIDENT=1
    _, _, kwargs = gemm_dispatch.kernel_specs(32, 28672, 4096, 64, False, "float16")[0]
    assert "ws_blocks" not in dict(kwargs)


def _fake_decode_kernels(monkeypatch, split: bool):
    """w4ax_linear's kernels replaced by recorders (CPU tensors): a split-K GEMM that adds 16 into
    every sum, and its epilogue; or one fused decode kernel."""
    from kernels_tl import gemm_dispatch
    calls = []

    def gemm(x_q, w_q, acc):
        calls.append("splitk")
        acc += 16

    def epilogue(acc, xs, ws, x_out, w_out, bias, y):
        calls.append("epilogue")
        y.copy_((acc.float() * (xs[:, None] * ws.float()[None] / 16)).half())
        acc.zero_()

    def fused(*args):
        calls.append("fused")
    monkeypatch.setattr(gemm_dispatch, "kernels_for", lambda *a: [gemm, epilogue] if split else [fused])
    return calls


def test_split_k_sums_go_to_the_norm_only_where_asked_and_possible(monkeypatch):
    import torch

    from kernels_tl import gemm_dispatch
    from kernels_tl.buffers import zeros
    m, n, k = 3, 128, 256
    x_q, xs = torch.zeros(m, k, dtype=torch.int8), torch.full((m,), 0.5)
    w_q, ws = torch.zeros(n, k // 2, dtype=torch.uint8), torch.full((n,), 2.0, dtype=torch.float16)
    calls = _fake_decode_kernels(monkeypatch, split=True)
    y = gemm_dispatch.w4ax_linear(x_q, xs, w_q, ws)  # not into the residual: the epilogue runs
    assert calls == ["splitk", "epilogue"] and torch.equal(y, torch.ones(m, n, dtype=torch.float16))
    calls.clear()
    sums = gemm_dispatch.w4ax_linear(x_q, xs, w_q, ws, into_residual=True)
    assert calls == ["splitk"] and isinstance(sums, gemm_dispatch.SplitKSums)
    assert torch.equal(sums.acc, torch.full((m, n), 16, dtype=torch.int32))
    assert sums.acc.data_ptr() == zeros("acc", m, n, torch.int32, x_q.device).data_ptr()  # the shared workspace
    sums.lead = (1, m)
    y = sums.materialize()
    assert calls == ["splitk", "epilogue"] and y.shape == (1, m, n) and torch.equal(y, torch.ones(1, m, n).half())
    assert not sums.acc.any()  # the epilogue left the workspace zero
    calls.clear()
    bias = torch.zeros(n, dtype=torch.float16)  # a bias (or outliers) keeps the epilogue kernel
    assert isinstance(gemm_dispatch.w4ax_linear(x_q, xs, w_q, ws, bias=bias, into_residual=True), torch.Tensor)
    monkeypatch.setattr(gemm_dispatch, "SPLITK_INTO_NORM", False)  # QUAD_SPLITK_INTO_NORM=0
    assert isinstance(gemm_dispatch.w4ax_linear(x_q, xs, w_q, ws, into_residual=True), torch.Tensor)
    assert calls == ["splitk", "epilogue"] * 2
    calls = _fake_decode_kernels(monkeypatch, split=False)  # one kernel covers K: nothing to defer
    monkeypatch.setattr(gemm_dispatch, "SPLITK_INTO_NORM", True)
    assert isinstance(gemm_dispatch.w4ax_linear(x_q, xs, w_q, ws, into_residual=True), torch.Tensor)


def test_branch_sums_are_materialized_wherever_the_norm_kernel_does_not_take_them():
    import torch

    from quad_engine import ops
    torch.manual_seed(0)
    h = torch.randn(2, 5, 64 + 256)
    branch = torch.randn(2, 5, 64 + 256).half()

    class Sums:  # stands in for gemm_dispatch.SplitKSums
        def materialize(self):
            return branch
    assert ops.materialize(branch) is branch and ops.materialize(None) is None
    expect = ops.rmsnorm_quant(h.clone(), 64, 256, 1e-5, 4, 0.9, residual=branch)
    h2 = h.clone()
    got = ops.rmsnorm_quant(h2, 64, 256, 1e-5, 4, 0.9, residual=Sums())  # CPU: the reference path
    assert all(torch.equal(a, b) for a, b in zip(got, expect)) and torch.equal(h2, h + branch.float())


def test_fused_swiglu_takes_prefill_gate_up_gemms_only_when_switched_on(monkeypatch):
    """QUAD_FUSED_SWIGLU (off by default): the gate_up GEMM above 64 tokens, in the register-unpack
    kernel, writes silu(gate) * up; the prebuild covers both token tiles under 1024 tokens and the
    one picked above; on the CPU (reference backend) ops.gate_up_swiglu declines, so the model runs
    the GEMM and the gated quantizer."""
    import torch

    from kernels_tl import gemm_dispatch, gemm_plans
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    from quad_engine import ops
    assert not gemm_dispatch.swiglu_fusable(2048, 28672)
    monkeypatch.setattr(gemm_dispatch, "FUSED_SWIGLU", True)
    assert gemm_dispatch.swiglu_fusable(65, 28672) and gemm_dispatch.swiglu_fusable(2048, 3072)
    assert not gemm_dispatch.swiglu_fusable(64, 28672) and not gemm_dispatch.swiglu_fusable(2048, 28672 + 64)
    builder, args, kwargs = gemm_dispatch._swiglu_spec(2048, 28672, 4096, 64, False)
    assert builder is w4ax_gemm_rs and dict(kwargs)["swiglu"] is True
    assert {key: v for key, v in kwargs if key not in ("swiglu", "fast_silu")} == gemm_plans.rs_tiles(2048, 28672, 4096)
    specs = []
    monkeypatch.setattr(gemm_dispatch, "_build_all", lambda s, workers=16: specs.extend(s))
    gemm_dispatch.prebuild([], swiglu_problems=[(65, 28672, 4096, 64, False), (2048, 28672, 4096, 64, False),
                                                (8, 28672, 4096, 64, False)])
    for m in (65, 100, 500, 1000, 2048, 4096):
        assert gemm_dispatch._swiglu_spec(m, 28672, 4096, 64, False) in specs
    assert len(specs) == 3  # two token tiles under 1024 tokens, the 256-token one above; none at 8
    monkeypatch.setattr(gemm_dispatch, "PREFILL_GEMM", "ws")  # only the register-unpack kernel has it
    assert not gemm_dispatch.swiglu_fusable(2048, 28672)
    weight = ops.QuantWeights(torch.zeros(256, 32, dtype=torch.uint8), torch.ones(256, 1, dtype=torch.float16),
                              None, None)
    assert ops.gate_up_swiglu(torch.zeros(100, 64, dtype=torch.int8), torch.ones(100, 1), weight) is None


def test_l2_prefetch_plan_follows_the_switch_the_site_and_the_token_count(monkeypatch):
    """L2 prefetch (kernels_tl.l2_prefetch): nowhere while QUAD_L2_PREFETCH_MB is 0 (the default),
    nowhere past decode sizes or at a site left out; in the norms only in the fused-add modes; the
    bytes are the first MB MiB of the weights, a multiple of 16, and none of a misaligned view."""
    import torch

    from kernels_tl import l2_prefetch, quantize
    assert l2_prefetch.MB == 0 and not l2_prefetch.enabled("norm", 1) and quantize.prefetch_blocks(1, "add") == 0
    monkeypatch.setattr(l2_prefetch, "MB", 1.0)
    monkeypatch.setattr(l2_prefetch, "BLOCKS", 132)
    assert [quantize.prefetch_blocks(m, "add") for m in (1, 64, 65)] == [132, 132, 0]
    assert [quantize.prefetch_blocks(1, mode) for mode in ("splitk", "float32", "float16")] == [132, 0, 0]
    assert [l2_prefetch.enabled(site, 1) for site in ("norm", "o", "down")] == [True] * 3
    monkeypatch.setattr(l2_prefetch, "SITES", frozenset({"down"}))
    assert [l2_prefetch.enabled(site, 1) for site in ("norm", "o", "down")] == [False, False, True]
    assert quantize.prefetch_blocks(1, "add") == 0
    w = torch.zeros(4096, 2048, dtype=torch.uint8)
    pf = l2_prefetch.prefetch_bytes(w)
    assert pf.dtype == torch.uint8 and pf.numel() == 1 << 20 and pf.data_ptr() == w.data_ptr()
    assert l2_prefetch.prefetch_bytes(torch.zeros(1000, dtype=torch.uint8)).numel() == 992  # whole 16-byte pieces
    assert l2_prefetch.prefetch_bytes(torch.zeros(4096, dtype=torch.uint8)[1:]) is None
    assert l2_prefetch.prefetch_bytes(torch.zeros(8, dtype=torch.uint8)) is None


def test_l2_prefetch_sites_are_checked_and_inert_on_the_cpu(monkeypatch):
    """An unknown site in QUAD_L2_PREFETCH_SITES is an error at import; ops.l2_prefetch does nothing
    on CPU tensors (the reference backend has no cache to warm) even with the switch on."""
    import importlib

    import torch

    from kernels_tl import l2_prefetch
    from quad_engine import ops
    monkeypatch.setenv("QUAD_L2_PREFETCH_SITES", "norm,qkv")
    try:
        with pytest.raises(ValueError, match="unknown sites"):
            importlib.reload(l2_prefetch)
    finally:
        monkeypatch.delenv("QUAD_L2_PREFETCH_SITES")
        importlib.reload(l2_prefetch)
    monkeypatch.setattr(l2_prefetch, "MB", 16.0)
    monkeypatch.setattr(l2_prefetch, "l2_prefetch_op", lambda w: pytest.fail("prefetch on the CPU"))
    weight = ops.QuantWeights(torch.zeros(64, 32, dtype=torch.uint8), torch.ones(64, 1).half(), None, None)
    ops.l2_prefetch(weight, "o", 1)


def test_engine_quantizer_prebuild_builds_the_prefetch_variants_it_will_run(monkeypatch):
    from types import SimpleNamespace

    from kernels_tl import hadamard_quant_dispatch, l2_prefetch, quantize
    from quad_engine import ops
    from quad_engine.config import HadamardSpec
    norms = []
    monkeypatch.setattr(quantize, "rmsnorm_quant", lambda *a, **kw: norms.append(
        (kw["residual"], kw["threads"], kw.get("prefetch_blocks", 0))))
    monkeypatch.setattr(hadamard_quant_dispatch, "prebuild_jobs", lambda probs, counts: [])
    monkeypatch.setattr(l2_prefetch, "MB", 16.0)
    monkeypatch.setattr(l2_prefetch, "BLOCKS", 132)
    cfg = SimpleNamespace(act_bits={"qkv": 4, "gate_up": 4, "o": 8, "down": 8}, rank=64, hidden_size=4096,
                          act_clip=0.9, rms_norm_eps=1e-5,
                          hadamard_o=HadamardSpec(size=4096, factors=[4096], block=None),
                          hadamard_down=HadamardSpec(size=14336, factors=[28, 512], block=None))
    ops.prebuild_quantizers(cfg, [1, 32, 2048])
    decode = quantize.DECODE_THREADS
    assert set(norms) == {("add", decode, 132), ("splitk", decode, 132), ("float32", decode, 0),
                          ("float16", decode, 0), ("add", None, 0), ("splitk", None, 0), ("float32", None, 0),
                          ("float16", None, 0)}
