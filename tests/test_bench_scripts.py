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
    for name in ("kernels", "sweeps", "attention"):
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
