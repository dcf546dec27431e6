"""quad-bench end to end on the CPU with tiny random models: valid JSON, table and plot (no timing asserted)."""

import json

import pytest

from quad_engine.cli.bench import main


def test_quad_bench_runs_every_system_and_writes_json_and_a_plot(tmp_path, capsys):
    code = main(["--arch", "smollm2-135m", "--layers", "1", "--vocab", "512", "--device", "cpu",
                 "--prefill", "1x16,2x8", "--decode", "1x16,2x16", "--decode-steps", "2", "--throughput", "3",
                 "--repeats", "1", "--out-dir", str(tmp_path), "--name", "run"])
    assert code == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert set(result["systems"]) == {"quad-w4a4", "quad-w4a4a8", "fp16", "hf"}
    for name, runs in result["systems"].items():
        assert [(r["batch"], r["tokens"]) for r in runs["prefill"]] == [(1, 16), (2, 8)]
        assert all(r["ms"] > 0 for r in runs["prefill"]) and all(r["ms_per_step"] > 0 for r in runs["decode"])
        # decode steps 2 x 1 repeat: the quartiles of two step times bracket their median
        assert all(r["ms_per_step_iqr"][0] <= r["ms_per_step"] <= r["ms_per_step_iqr"][1] for r in runs["decode"])
        if name.startswith("quad"):
            assert runs["throughput"]["requests"] == 3 and "speedup_vs_fp16" in runs["decode"][0]
            # The time breakdown at every measured shape.
            assert [(b["batch"], b["tokens"]) for b in runs["breakdown"]["prefill"]] == [(1, 16), (2, 8)]
            assert [(b["batch"], b["context"]) for b in runs["breakdown"]["decode"]] == [(1, 16), (2, 16)]
            for entry in runs["breakdown"]["prefill"] + runs["breakdown"]["decode"]:
                parts = entry["ms"]
                assert parts["gemm"] > 0 and parts["attention"] > 0 and parts["total"] >= parts["gemm"]
        assert all(r["gbps"] > 0 and r["bytes_read"] > 0 for r in runs["decode"])
    # The 4-bit engines read fewer bytes a step than the fp16 engine at the same batch and context.
    quad, fp16 = result["systems"]["quad-w4a4"]["decode"][0], result["systems"]["fp16"]["decode"][0]
    assert quad["bytes_read"] < fp16["bytes_read"]
    assert len(result["environment"]["source_digest"]) == 16
    assert (tmp_path / "run.png").stat().st_size > 0
    table = (tmp_path / "run.md").read_text()
    assert "| 1 x 16 |" in table
    assert f"sources {result['environment']['source_digest']})" in table.splitlines()[0]
    for section in ("## Throughput", "## Prefill time by op (1 x 16;", "## Prefill time by op (2 x 8;",
                    "## Decode time by op (1 x 16;", "## Decode time by op (2 x 16;"):
        assert section in table
    if result["environment"].get("copy_gbps"):
        assert "## Decode read bandwidth" in table


def test_unfused_system_runs_with_fusions_off_and_restores_the_setting(tmp_path, monkeypatch):
    from quad_engine import ops
    seen = []
    norm_quant = ops.rmsnorm_quant
    monkeypatch.setattr(ops, "rmsnorm_quant", lambda *a, **k: seen.append(ops.fusions_enabled()) or norm_quant(*a, **k))
    monkeypatch.delenv("QUAD_FUSE", raising=False)
    code = main(["--arch", "smollm2-135m", "--layers", "1", "--vocab", "512", "--device", "cpu",
                 "--systems", "quad-w4a4a8-unfused", "--prefill", "1x16", "--decode", "1x16", "--decode-steps", "2",
                 "--throughput", "0", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "run"])
    assert code == 0
    assert seen and not any(seen)
    assert ops.fusions_enabled()
    assert list(json.loads((tmp_path / "run.json").read_text())["systems"]) == ["quad-w4a4a8-unfused"]


def test_engine_memory_counts_the_kv_blocks_the_batch_occupies():
    """Peak memory charges an engine the KV blocks of the measured batch x tokens, not the pool the
    bench allocates for its largest shape."""
    from types import SimpleNamespace

    from quad_engine import kv_cache
    from quad_engine.bench import _engine_gb
    from quad_engine.synthetic import synthetic_config
    cfg = synthetic_config("smollm2-135m")
    per_block = kv_cache.bytes_per_block(cfg, 64)
    llm = SimpleNamespace(cfg=cfg, block_size=64, num_blocks=100)
    weights = 3 * 2 ** 30
    peak = weights + 100 * per_block  # the whole pool allocated, nothing else
    # 2 sequences of 65 tokens occupy 2 blocks each.
    assert _engine_gb(llm, peak, 2, 65) == (weights + 4 * per_block) / 2 ** 30


@pytest.mark.parametrize("system,int8", [("quad-w4a4a8", True), ("quad-w4a4a8-head16", False)])
def test_quad_systems_run_the_int8_head_and_head16_the_float16_one(tmp_path, monkeypatch, system, int8):
    from quad_engine import ops
    calls = []
    head = ops.head_w8a8
    monkeypatch.setattr(ops, "head_w8a8", lambda *a: calls.append(1) or head(*a))
    code = main(["--arch", "smollm2-135m", "--layers", "1", "--vocab", "512", "--device", "cpu",
                 "--systems", system, "--prefill", "1x16", "--decode", "1x16", "--decode-steps", "2",
                 "--throughput", "0", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "run"])
    assert code == 0 and bool(calls) == int8
    assert list(json.loads((tmp_path / "run.json").read_text())["systems"]) == [system]


def test_a_failing_system_is_reported_and_the_others_still_measured(tmp_path, monkeypatch):
    from quad_engine import bench
    engine = bench._engine

    def broken(plan, system, *args):
        if system == "quad-w4a4":
            raise RuntimeError("no kernel for this shape\nsecond line")
        return engine(plan, system, *args)

    monkeypatch.setattr(bench, "_engine", broken)
    code = main(["--arch", "smollm2-135m", "--layers", "1", "--vocab", "512", "--device", "cpu",
                 "--systems", "quad-w4a4,quad-w4a4a8", "--prefill", "1x16", "--decode", "1x16", "--decode-steps", "2",
                 "--throughput", "0", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "run"])
    assert code == 1
    result = json.loads((tmp_path / "run.json").read_text())
    assert list(result["systems"]) == ["quad-w4a4a8"]
    assert result["failed"] == {"quad-w4a4": "RuntimeError: no kernel for this shape"}
    assert "## Systems that failed" in (tmp_path / "run.md").read_text()


def test_report_header_keeps_the_dirty_mark_and_names_the_sources():
    from quad_engine.bench_report import code_line
    assert code_line({"git_commit": "dc603654199ab0e100b309bdc1d6b6d5ad4dc041-dirty", "source_digest": "4100691bc2f57444"}) \
        == "commit dc60365419-dirty, sources 4100691bc2f57444"
    assert code_line({"git_commit": "dc603654199ab0e100b309bdc1d6b6d5ad4dc041"}) == "commit dc60365419"
    assert code_line({"git_commit": None}) == "commit ?"
