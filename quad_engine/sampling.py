"""Sampling parameters and the batched sampler.

The math is batched on the logits' device with no host synchronization (the step's tokens are
copied to the host once, by the engine). A request with a seed draws its noise from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0: greedy
    top_k: int = -1                   # -1: off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


class Sampler:
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """Next token [B] (int64, on the logits' device) for logits [B, V]."""
        logits = logits.float()
        greedy = logits.argmax(-1)
        if all(p.temperature == 0 for p in params):
            return greedy
        dev, vocab = logits.device, logits.shape[-1]
        temps = torch.tensor([p.temperature for p in params], device=dev)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        ordered, order = (logits / temps.clamp(min=1e-6).unsqueeze(1)).sort(-1, descending=True)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        probs = ordered.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf")).softmax(-1)
        # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p.unsqueeze(1), 0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p (no normalization needed).
        noise = torch.empty_like(probs)
        for i, gen in enumerate(generators or [None] * len(params)):
            noise[i].exponential_(generator=gen)
        choice = (probs / noise).argmax(-1, keepdim=True)
        sampled = order.gather(1, choice).squeeze(1)
        return torch.where(temps == 0, greedy, sampled)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
