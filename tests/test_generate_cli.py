"""quad-generate: a real run on a tiny converted checkpoint, and one clear line for each bad input."""

import json
import shutil

import pytest
import torch

from converter.pipeline import ConvertOptions, convert
from quad_engine.cli.generate import main
from tiny import save_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = save_tiny(root / "src", "llama")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = ConvertOptions(rank=8, mode="w4a4", kv_bits=4, nsamples=4, seqlen=32)
    return convert(str(src), root / "quad", opts, calib_tokens=calib, progress=False)


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), [line for line in out.err.strip().splitlines() if line]


def test_generates_json_lines_and_reports_throughput(checkpoint, capsys):
    code, out, err = run(capsys, checkpoint, "--prompt", "Once upon", "--prompt", "a time", "--max-new-tokens", "5",
                         "--json", "--device", "cpu", "--kv-cache-gb", "0.01")
    assert code == 0
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == ["Once upon", "a time"]
    assert all(1 <= r["generated_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert "tok/s prefill" in err[-1] and "tok/s decode" in err[-1]


@pytest.mark.parametrize("flag,int8", [(None, True), ("--int8-head", True), ("--no-int8-head", False)])
def test_int8_head_flag(checkpoint, capsys, monkeypatch, flag, int8):
    """int8 embedding / lm_head by default; --no-int8-head keeps the float16 tables."""
    from quad_engine import ops
    calls = []
    head = ops.head_w8a8
    monkeypatch.setattr(ops, "head_w8a8", lambda *a: calls.append(1) or head(*a))
    code, out, _ = run(capsys, checkpoint, "--prompt", "Once upon", "--max-new-tokens", "3", "--json", "--device", "cpu",
                       "--kv-cache-gb", "0.01", *([flag] if flag else []))
    assert code == 0 and 1 <= json.loads(out[0])["generated_tokens"] <= 3
    assert bool(calls) == int8


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nope", "--prompt", "hi")
    assert code != 0 and len(err) == 1 and "not found" in err[0]


def test_checkpoint_of_another_format_version(checkpoint, tmp_path, capsys):
    other = tmp_path / "v2"
    shutil.copytree(checkpoint, other)
    cfg = json.loads((other / "quad_config.json").read_text())
    cfg["format_version"] = 2
    (other / "quad_config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, other, "--prompt", "hi", "--device", "cpu")
    assert code != 0 and len(err) == 1 and "format version 2" in err[0]


def test_prompt_longer_than_the_context(checkpoint, capsys):
    code, _, err = run(capsys, checkpoint, "--prompt", "x" * 40, "--max-model-len", "16", "--device", "cpu",
                       "--kv-cache-gb", "0.01")
    assert code != 0 and len(err) == 1 and "context of 16 tokens" in err[0]


def test_empty_prompt(checkpoint, capsys):
    code, _, err = run(capsys, checkpoint, "--prompt", "", "--device", "cpu", "--kv-cache-gb", "0.01")
    assert code != 0 and len(err) == 1 and "empty prompt" in err[0]


@pytest.mark.parametrize("flag,value,field", [("--top-p", "0", "top_p"), ("--temperature", "-1", "temperature"),
                                              ("--top-k", "0", "top_k"), ("--max-new-tokens", "0", "max_tokens")])
def test_invalid_sampling_value(checkpoint, capsys, flag, value, field):
    code, _, err = run(capsys, checkpoint, "--prompt", "hi", flag, value)
    assert code == 2 and len(err) == 1 and field in err[0]


def test_max_num_batched_tokens_chunks_a_long_prompt_without_changing_the_text(checkpoint, capsys):
    prompt = "Once upon a time there was a small town by the sea, and every morning"
    outputs = []
    for extra in ([], ["--max-num-batched-tokens", "4"]):
        code, out, _ = run(capsys, checkpoint, "--prompt", prompt, "--max-new-tokens", "6", "--json", "--device", "cpu",
                           "--kv-cache-gb", "0.01", *extra)
        assert code == 0
        outputs.append(json.loads(out[0]))
    assert outputs[0]["prompt_tokens"] > 4 and outputs[0]["text"] == outputs[1]["text"]
