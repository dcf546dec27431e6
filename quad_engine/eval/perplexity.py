"""Perplexity over fixed windows, as GPTQ / QuaRot report it (each window scored independently)."""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm


def window_nll(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int]:
    """Summed NLL of tokens 1..T-1 given their prefixes, log-softmax in float32, chunked over tokens."""
    pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    total = 0.0
    for s in range(0, target.numel(), chunk):
        total += float(F.cross_entropy(pred[s:s + chunk].float(), target[s:s + chunk], reduction="sum"))
    return total, target.numel()


def perplexity(model_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 1,
               device: str | torch.device = "cpu", progress: bool = True) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress,
                      file=sys.stderr):
            ids = windows[s:s + batch_size].to(device)
            total, n = window_nll(model_fn(ids), ids)
            nll, count = nll + total, count + n
    return math.exp(nll / count)
