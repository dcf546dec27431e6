"""Text for calibration and perplexity: local files, or dataset names through `datasets` when online."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
DEMO_CALIB_TEXT = DATA_DIR / "calib_emma.txt"
DEMO_EVAL_TEXT = DATA_DIR / "eval_sense_and_sensibility.txt"


class DataError(ValueError):
    """Text that cannot be loaded or is too short; str() is one line for the user."""


def _hub_text(name: str, split: str) -> str:
    """The texts GPTQ and QuaRot calibrate and evaluate on, as they load them."""
    try:
        from datasets import load_dataset
        if name == "wikitext2":
            ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            hub_split = "train" if split == "train" else "validation"
            ds = load_dataset("allenai/c4", data_files={hub_split: files[hub_split]}, split=hub_split)
            return "\n\n".join(ds["text"][:20000])
    except ImportError:
        raise DataError(f"dataset {name!r} needs the `datasets` package (pip install 'quad-engine[eval]'); "
                        "or pass a local .txt/.jsonl file") from None
    except Exception as e:  # offline, hub errors
        raise DataError(f"dataset {name!r} could not be loaded ({type(e).__name__}); pass a local .txt/.jsonl "
                        "file instead") from None
    raise AssertionError(name)


HUB_DATASETS = ("wikitext2", "c4")


def load_text(spec: str, split: str = "test") -> str:
    """A .txt file, a .jsonl(.gz) file (its `text` fields), or a dataset name (wikitext2, c4)."""
    path = Path(spec)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
        return path.read_text(encoding="utf-8")
    if spec in HUB_DATASETS:
        return _hub_text(spec, split)
    raise DataError(f"{spec}: no such file, and not a known dataset name ({', '.join(HUB_DATASETS)})")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def calibration_batches(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples random windows of seqlen tokens ([nsamples, seqlen]), as GPTQ samples calibration data."""
    ids = _tokenize(tokenizer, load_text(spec, split="train"))
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text {spec} has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] of the tokenized text (last partial one dropped)."""
    ids = _tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)
