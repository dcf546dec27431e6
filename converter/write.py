"""Checkpoint writing: sharded safetensors in a temporary directory, renamed into place at the end.

An interrupted conversion leaves no half checkpoint: everything is written under a hidden sibling
directory of OUT_DIR, which is renamed (or removed on failure) only when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from quad_engine.checkpoint import INDEX_NAME, SINGLE_NAME

MAX_SHARD_BYTES = 2 * 1024**3


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR unless forced, before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; pass --force to overwrite it")


class CheckpointWriter:
    """Streams tensors into ≤ 2 GB safetensors shards; `commit()` makes the checkpoint appear."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | str] = []
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0

    @property
    def path(self) -> Path:
        """Where side files (config, tokenizer, logs) go before commit."""
        return self.tmp_dir

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map or name in self._pending:
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards)
        file_name = f"model-{index + 1:05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / file_name), metadata={"format": "pt"})
        for name in self._pending:
            self._weight_map[name] = file_name
        self._shards.append(file_name)
        self._pending, self._pending_bytes = {}, 0

    def commit(self, force: bool = False) -> Path:
        """Finish the last shard, write the index, and rename the directory into place."""
        self._flush()
        if len(self._shards) == 1:
            os.replace(self.tmp_dir / self._shards[0], self.tmp_dir / SINGLE_NAME)
        else:
            # Shard names carry their count only once it is known, as HF does.
            renamed = {}
            for i, old in enumerate(self._shards):
                new = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
                os.replace(self.tmp_dir / old, self.tmp_dir / new)
                renamed[old] = new
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": {k: renamed[v] for k, v in sorted(self._weight_map.items())}}
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.out_dir.exists():
            check_output_dir(self.out_dir, force)
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
