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
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        # A bare string would be taken character by character.
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")


class Sampler:
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None] | None = None,
               greedy: torch.Tensor | None = None) -> torch.Tensor:
        """Next token [B] (int64, on the logits' device) for logits [B, V], one request per row.
        greedy: logits.argmax(-1) when the caller has it already (a decode step's CUDA graph)."""
        if all(p.temperature == 0 for p in params):
            return logits.argmax(-1) if greedy is None else greedy
        vocab = logits.shape[-1]
        # One host-to-device copy for the three per-row settings (top-k is exact as a float32).
        rows = [[p.temperature for p in params], [p.top_k if p.top_k > 0 else vocab for p in params],
                [p.top_p for p in params]]
        packed = _to_device(torch.tensor(rows, dtype=torch.float32), logits.device)
        truncates = any(p.top_k > 0 or p.top_p < 1 for p in params)
        return sample_tokens(logits, packed[0], packed[1].long() if truncates else None,
                             packed[2] if truncates else None, generators, greedy)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor | None = None,
                  top_ps: torch.Tensor | None = None,
                  generators: list[torch.Generator | None] | None = None,
                  greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Next token [B] for logits [B, V]: temperature 0 rows take the argmax, the others sample from
    softmax(logits / temperature) cut to the top_k most likely tokens, then to the smallest prefix
    whose mass reaches top_p. top_ks and top_ps None: no row truncates (and nothing is sorted).
    generators[i], when given, draws row i's noise: the same generator state gives the same token
    whatever the other rows are. greedy: logits.argmax(-1), when already computed."""
    logits = logits.float()
    greedy = logits.argmax(-1) if greedy is None else greedy
    temps = torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
    probs = (logits / temps).softmax(-1)
    if top_ks is not None:
        ordered, order = probs.sort(-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
        drop = ranks >= top_ks.unsqueeze(1)
        kept = ordered.masked_fill(drop, 0)
        kept = kept / kept.sum(-1, keepdim=True)  # top-p is measured on the top-k distribution
        top_p = top_ps.unsqueeze(1)
        # The mass before a token already reaches p: it is not needed (the first token always stays).
        drop |= (kept.cumsum(-1) - kept >= top_p) & (top_p < 1)
        # Mask in vocabulary order, so that a row's noise meets the same token whether or not some
        # row of the batch truncates.
        probs = probs.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), 0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p (no normalization needed).
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators or ()):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    # An exact zero draw would make 0 / 0 = NaN win the argmax for a dropped token.
    sampled = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
    return torch.where(temperatures == 0, greedy, sampled)


def argmax_rows(logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """logits.argmax(-1) for [B, V], the same indices (the first maximum; NaN counts as the
    maximum). chunk None: torch's argmax; chunk d (a divisor of V): two passes over a [B, V / d, d]
    view, the first maximum of each chunk and then the first chunk whose maximum is the largest,
    whose first maximum is the row's. Which is faster depends on V through torch's reduction
    heuristics (H200, device time in a CUDA graph, one row: 128256 wide 41 µs directly, 17 µs in
    chunks of 384; 151936 wide 13 µs directly, 23 µs in chunks of 1187): fastest_argmax_chunk."""
    if chunk is None:
        return logits.argmax(-1)
    b, v = logits.shape
    values, within = logits.view(b, v // chunk, chunk).max(-1)   # [B, V / d]: each chunk's first maximum
    first = values.argmax(-1, keepdim=True)                       # the first chunk holding the largest
    return (first * chunk + within.gather(-1, first)).squeeze(-1)


def argmax_chunks(v: int) -> list[int]:
    """Chunk widths argmax_rows may use at vocabulary v: 128 and 256 where they divide it
    (vocabularies are usually padded to such multiples) and the smallest divisor from sqrt(v) up to
    8·sqrt(v) (Llama-3's 128256: 384; Qwen2.5's 151936: 1187; SmolLM2's 49152: 256)."""
    root = int(v ** 0.5)
    near_root = next((d for d in range(max(root, 1), 8 * root + 1) if v % d == 0), None)
    return sorted({d for d in (128, 256, near_root) if d is not None and v % d == 0 and v // d > 1})


def fastest_argmax_chunk(rows: int, vocab: int, device: torch.device, reps: int = 10) -> int | None:
    """The argmax_rows form (chunk None or one of argmax_chunks) with the least device time for
    [rows, vocab] float32 logits on this GPU: each captured as a CUDA graph of `reps` calls and
    timed over a few replays, as the engine's decode graphs will run it."""
    logits = torch.randn(rows, vocab, device=device)
    best, best_ms = None, float("inf")
    for chunk in [None] + argmax_chunks(vocab):
        argmax_rows(logits, chunk)  # outside the capture: lazy initialization, allocator warm-up
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                argmax_rows(logits, chunk)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) < best_ms:
            best, best_ms = chunk, start.elapsed_time(end)
    return best


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A plain copy to a GPU waits for the stream to drain (the step's forward); from pinned memory
    # it is queued behind the forward instead.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
