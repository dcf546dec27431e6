"""The GPU-only kernel benchmark scripts import and parse their arguments on a CPU (triton, whose
do_bench they time with, is stubbed where it is not installed): a moved helper or a broken import
shows here, not in the first minutes of a device run."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("tilelang")
BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_modules(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        testing = types.ModuleType("triton.testing")
        testing.do_bench = lambda *a, **k: pytest.fail("timed on a CPU")
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
        monkeypatch.setitem(sys.modules, "triton.testing", testing)
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("kernels", "sweeps", "sweeps_prefill", "sweeps_quantize", "attention"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return {name: importlib.import_module(name) for name in ("kernels", "sweeps", "attention")}


@pytest.mark.parametrize("name", ["kernels", "sweeps", "attention"])
def test_bench_script_help(name, bench_modules, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        bench_modules[name].main()
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


def test_sweeps_needs_a_choice(bench_modules, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sweeps.py", "--out", "x.json"])
    with pytest.raises(SystemExit) as exit_info:
        bench_modules["sweeps"].main()
    assert exit_info.value.code == 2 and "choose a sweep" in capsys.readouterr().err


def test_ncu_target_script_imports():
    """scripts/gpu_ncu_targets.py (launched under Nsight Compute on the GPU) finds every kernel entry
    point it names."""
    spec = importlib.util.spec_from_file_location("gpu_ncu_targets", BENCH.parent / "scripts" / "gpu_ncu_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)


def test_gemm_rows_time_the_kernels_the_dispatch_did_not_pick(bench_modules):
    """bench/kernels.py's further kernels a row: the others of those the dispatch chooses between."""
    from kernels_tl.gemm import w4ax_gemm
    from kernels_tl.gemm_decode import w4ax_gemm_decode
    from kernels_tl.gemm_ws import w4ax_gemm_decode_ws
    alternatives = bench_modules["kernels"].alternative_kernels
    from kernels_tl.gemm_rs import w4ax_gemm_rs
    from kernels_tl.gemm_ws import w4ax_gemm_ws
    prefill = dict(alternatives(2048, 4160, 4096, 0))  # the dispatch: the register-unpack kernel, 3 stages
    assert list(prefill) == ["ws", "pipelined", "rs_s3", "rs_t128", "rs_k256"] and prefill["pipelined"][0] is w4ax_gemm
    assert prefill["pipelined"][1] == (4160, 4096, 0, False, "float16") and prefill["ws"][0] is w4ax_gemm_ws
    assert all(prefill[v][0] is w4ax_gemm_rs for v in ("rs_s3", "rs_t128", "rs_k256"))
    assert dict(prefill["rs_t128"][2])["block_t"] == 128 and dict(prefill["rs_k256"][2])["block_k"] == 256
    middle = dict(alternatives(512, 4160, 4096, 0))  # the dispatch: the register-unpack kernel, 128-token tiles
    assert list(middle) == ["ws", "pipelined", "rs", "rs_s3", "rs_k256"]
    for n, rank in ((28672, 0), (6144, 64)):  # gate_up, qkv: the two-blocks-a-SM register-unpack kernel picked
        others = dict(alternatives(16, n, 4096, rank))
        assert list(others) == ["decode_pipelined", "decode_ws", "decode_rs", "decode_rs1"]
        assert others["decode_ws"][0] is w4ax_gemm_decode_ws
        builder, args, kwargs = others["decode_pipelined"]  # the same tiles, unpacked through shared memory
        assert builder is w4ax_gemm_decode and args[5] == 16 and "register_unpack" not in dict(kwargs)
        builder, args, kwargs = others["decode_rs1"]  # the same tiles, one register fragment
        assert builder is w4ax_gemm_decode and args[5] == 16 and "overlap_unpack" not in dict(kwargs)
        assert all("ws_blocks" not in dict(kw) for _, _, kw in others.values())
    assert alternatives(16, 4160, 4096, 0) == [] and alternatives(1, 4160, 4096, 0) == []  # split-K, GEMV


def test_decode_ws_sweep_variants_fit_the_kernel(bench_modules):
    """bench/sweeps.py --decode-ws: every tile it sweeps is one the kernel accepts (K tiles >=
    stages, unpacked tiles <= stages, shared memory within a SM), and the dispatch's tile is among them."""
    from kernels_tl import gemm_plans
    variants = bench_modules["sweeps"].decode_ws_variants(28672, 4096, 32)
    assert (gemm_plans.DECODE_WS_TILES["block_k"], gemm_plans.DECODE_WS_TILES["num_stages"], 2) in variants
    assert all(4096 % bk == 0 and 4096 // bk >= st and bufs <= st for bk, st, bufs in variants)
    assert len(set(variants)) == len(variants) >= 12


def test_sweep_rows_report_build_and_run_errors_and_time_the_rest(bench_modules, monkeypatch, capsys):
    """bench/sweeps.py's decode sweeps share one row frame (_measured): a variant that failed to
    build or to run is a row with its error; the others are checked, then timed over every weight
    copy, with GB/s on the packed weight."""
    sweeps = bench_modules["sweeps"]
    timed = []
    monkeypatch.setattr(sweeps, "bench_graph", lambda fns: [f() for f in fns] and timed.append(len(fns)) or 0.002)
    calls = []
    row = sweeps._measured({"v": 1}, "kernel", lambda kern: {"exact": kern == "kernel"},
                           lambda kern, w: calls.append(w), ["w0", "w1", "w2"], 4_000_000, "decode")
    assert row == {"v": 1, "exact": True, "ms": 0.002, "gbps": 2000.0} and calls == ["w0", "w1", "w2"] and timed == [3]
    row = sweeps._measured({"v": 2}, RuntimeError("ptxas failed\nmore"), None, None, ["w0"], 1, "decode")
    assert row == {"v": 2, "error": "ptxas failed"}

    def fails(kern):
        raise ValueError("misaligned")
    assert sweeps._measured({}, "kernel", fails, None, ["w0"], 1, "decode-ws") == {"error": "misaligned"}
    assert "sweep decode-ws {'error': 'misaligned'}" in capsys.readouterr().out


def test_ncu_regions_cuts_the_source_page_at_barriers(tmp_path):
    """scripts/ncu_regions.py: instructions, opcodes and stall samples summed per barrier-delimited
    region of an ncu source page (its CSV layout: a kernel-name line, then the header)."""
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    try:
        import ncu_regions
    finally:
        sys.path.pop(0)
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_barrier", "stall_short_sb", "stall_barrier (Not Issued)"]
    rows = [["0x0", "  LDS.U.128 R4, [R2]", "5", "100", "0", "4", "0"],
            ["0x1", "  @!P0 FADD R1, R2, R3", "1", "300", "0", "0", "0"],
            ["0x2", "  BAR.SYNC.DEFER_BLOCKING 0x0", "8", "10", "7", "0", "7"],
            ["0x3", "  FFMA R1, R2, R3, R4", "2", "1,000", "0", "1", "0"],
            ["0x4", "  STG.E [R2], R1", "-", "10", "0", "0", "0"]]
    path = tmp_path / "source.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in row) for row in [["Kernel Name", "main_kernel"], header] + rows))
    found = ncu_regions.regions(str(path))
    assert [r.instructions for r in found] == [410, 1010]
    assert found[0].opcodes == {"LDS": 100, "FADD": 300, "BAR": 10}
    assert found[0].stalls["barrier"] == 7 and found[0].stalls["short_sb"] == 4 and found[1].samples == 2
    text = ncu_regions.report(found, elements=32 * 1420)
    assert text.startswith("kernel: 1.00/element instructions, 2 regions") and "barrier 44%" in text  # 7 of 16 samples
