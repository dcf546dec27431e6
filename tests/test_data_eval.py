"""Text loading, calibration/eval windows, perplexity, and the quad-eval CLI."""

import gzip
import json
import math

import pytest
import torch

from quad_engine.cli.eval import main as eval_main
from quad_engine.data import (DEMO_CALIB_TEXT, DEMO_EVAL_TEXT, DataError, calibration_batches, eval_windows,
                              load_text)
from quad_engine.eval.perplexity import perplexity
from tiny import VOCAB, byte_tokenizer, save_tiny

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n" * 10


def test_windows_are_consecutive_and_non_overlapping():
    tok = byte_tokenizer()
    w = eval_windows(tok, TEXT, 64)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False).input_ids)
    assert w.shape == (len(ids) // 64, 64)
    assert torch.equal(w.flatten(), ids[: w.numel()])
    assert eval_windows(tok, TEXT, 64, max_tokens=200).shape == (3, 64)
    with pytest.raises(DataError):
        eval_windows(tok, "short", 64)


def test_calibration_batches_are_seeded(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    tok = byte_tokenizer()
    a = calibration_batches(tok, str(path), 6, 32, seed=0)
    assert a.shape == (6, 32)
    assert torch.equal(a, calibration_batches(tok, str(path), 6, 32, seed=0))
    assert not torch.equal(a, calibration_batches(tok, str(path), 6, 32, seed=1))
    with pytest.raises(DataError, match="fewer than"):
        calibration_batches(tok, str(path), 2, 10_000, seed=0)


def test_jsonl_and_errors(tmp_path):
    rows = [{"text": "first doc"}, {"text": "second doc"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert load_text(str(tmp_path / "a.jsonl")) == "first doc\n\nsecond doc"
    assert load_text(str(tmp_path / "b.jsonl.gz")) == "first doc\n\nsecond doc"
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))


def test_perplexity_of_uniform_and_perfect_models():
    windows = torch.randint(0, 50, (3, 17))
    uniform = lambda ids: torch.zeros(*ids.shape, 50)  # noqa: E731

    def perfect(ids):
        logits = torch.full((*ids.shape, 50), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), 0.0)
        return logits

    assert math.isclose(perplexity(uniform, windows, progress=False), 50, rel_tol=1e-4)
    assert math.isclose(perplexity(perfect, windows, progress=False), 1.0, rel_tol=1e-4)


def test_bundled_texts_are_large_enough():
    tok = byte_tokenizer()  # bytes: a lower bound on BPE tokens is a quarter of that
    assert len(DEMO_EVAL_TEXT.read_bytes()) >= 4 * 64_000 and len(DEMO_CALIB_TEXT.read_bytes()) >= 200_000
    assert DEMO_EVAL_TEXT.read_text()[:200] != DEMO_CALIB_TEXT.read_text()[:200]
    assert len(tok(DEMO_EVAL_TEXT.read_text()[:1000]).input_ids) > 0


def test_cli_on_an_fp16_source_and_a_checkpoint(tmp_path, capsys):
    from converter.pipeline import ConvertOptions, convert
    src = save_tiny(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out_json = tmp_path / "r.json"
    assert eval_main(["ppl", str(src), "--text", str(text), "--seqlen", "32", "--json", str(out_json),
                      "--device", "cpu"]) == 0
    fp = json.loads(out_json.read_text())
    assert 1 < fp["ppl"] < 2 * VOCAB and fp["seqlen"] == 32
    ckpt = convert(str(src), tmp_path / "ckpt", ConvertOptions(rank=0, mode="w16a16", kv_bits=16, dtype="float32"),
                   calib_tokens=torch.randint(0, 256, (2, 32)), progress=False)
    # The rotations alone (float16 tables) leave the model's function unchanged...
    assert eval_main(["ppl", str(ckpt), "--text", str(text), "--seqlen", "32", "--json", str(out_json),
                      "--device", "cpu", "--no-int8-head"]) == 0
    assert math.isclose(json.loads(out_json.read_text())["ppl"], fp["ppl"], rel_tol=1e-4)
    # ...and the default int8 embedding / lm_head rows change it only slightly.
    assert eval_main(["ppl", str(ckpt), "--text", str(text), "--seqlen", "32", "--json", str(out_json),
                      "--device", "cpu"]) == 0
    int8 = json.loads(out_json.read_text())["ppl"]
    assert int8 != fp["ppl"] and math.isclose(int8, fp["ppl"], rel_tol=1e-2)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["ppl", str(tmp_path / "nope"), "--text", str(DEMO_EVAL_TEXT)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
