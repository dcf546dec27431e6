"""Prefill steps as CUDA graphs broken at attention (piecewise capture, as vLLM does).

A 1 x 2048 prefill of Llama-3-8B shapes runs ~30 ms of kernels but took ~40 ms end to end: the
Python that launches its ~300 kernels is slower than the GPU that runs them. Here everything
between two attentions (o_proj, the MLP, the next norm, the qkv GEMM, RoPE + the KV store) is one
CUDA graph, so the host replays 33 graphs and runs 32 attentions instead of launching every kernel.

Attention stays eager: a prefill attends each sequence to its own tokens, one SDPA call a sequence,
sized by the host's query lengths. A step's T tokens are padded up to a bucket of token counts;
padding rows have token 0 at position 0 and slot -1 (the KV store skips them), and every kernel
but attention works row by row, so they never reach the real rows. Attention reads only the real
rows and writes only their outputs.

A step of one sequence (the common time-to-first-token case) needs no break at all: causal
attention over the padded bucket gives its real rows exactly what attention over the T real tokens
gives (row i attends to keys 0..i, and the padding comes after them), so its whole forward,
attention included, is one graph.

A bucket's graphs are captured on its first use (about two eager prefills of its size), not at
start-up. Prefills with a cached prefix (a later chunk of a long prompt, a resumed sequence) run
eagerly, as do steps above the largest bucket. A capture that fails raises CaptureFailed; the
engine warns once and runs its prefills eagerly from then on.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from quad_engine import kv_ops
from quad_engine.context import StepContext, set_context

# The largest bucket: its activations stay in the graph pool (~0.3 GB by the tensor sizes at 2048
# tokens of Llama-3-8B); longer steps are long enough for the GPU to hide the host's launches.
MAX_TOKENS = int(os.environ.get("QUAD_PREFILL_GRAPH_MAX", "2048"))


def enabled() -> bool:
    """QUAD_PREFILL_GRAPHS=0 runs every prefill eagerly (for A/B runs and for isolating a kernel)."""
    return os.environ.get("QUAD_PREFILL_GRAPHS", "1") != "0"


def buckets(max_tokens: int = MAX_TOKENS) -> list[int]:
    """16, 32, 64, then every 128 (at most 127 padding rows), and max_tokens itself last."""
    sizes = [b for b in (16, 32, 64) if b < max_tokens] + list(range(128, max_tokens, 128))
    return sizes + [max_tokens]


def bucket_for(tokens: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds `tokens`, None above the largest."""
    return next((b for b in sizes if b >= tokens), None)


def pad_inputs(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's packed inputs padded to `size` rows: token 0 at position 0, slot -1."""
    pad = size - ids.shape[0]
    return (torch.nn.functional.pad(ids, (0, pad)), torch.nn.functional.pad(positions, (0, pad)),
            torch.nn.functional.pad(slots, (0, pad), value=-1))


class CaptureFailed(RuntimeError):
    """A bucket's graphs could not be captured (the engine then runs its prefills eagerly)."""


@dataclass
class _BucketGraph:
    ids: torch.Tensor                 # static inputs [size]
    positions: torch.Tensor
    slots: torch.Tensor
    pieces: list = field(default_factory=list)       # torch.cuda.CUDAGraph: 1, or layers + 1
    attentions: list = field(default_factory=list)   # (q, k, v) each layer's attention reads
    h: torch.Tensor | None = None                    # the forward's outputs (model.residual)
    pending: torch.Tensor | None = None


class PrefillGraphs:
    """Captures (on first use of a bucket) and replays the graphs of a model's prefill steps.

    `attn_out` [max bucket, heads, head_dim] float16 is every layer's attention output: layer i's
    is consumed by the graph after it before layer i + 1's attention writes it."""

    def __init__(self, model, device: torch.device, max_tokens: int = MAX_TOKENS, pool=None):
        self.model, self.device = model, device
        self.sizes = buckets(max_tokens)
        self.pool = pool  # shared with the decode graphs: never replayed at the same time
        cfg = model.cfg
        self.attn_out = torch.empty(self.sizes[-1], cfg.num_heads, cfg.head_dim, dtype=torch.float16, device=device)
        self.graphs: dict[tuple[int, bool], _BucketGraph] = {}  # (bucket, one sequence) -> its graphs
        self._capturing: _BucketGraph | None = None
        self._query_lens: list[int] = []
        # A step's padded inputs on the host (pinned on a GPU: copied without waiting), and an
        # event recorded after the copies out of them (see _stage).
        pinned = device.type == "cuda"
        buffers = [torch.empty(self.sizes[-1], dtype=dtype) for dtype in (torch.long, torch.long, torch.int32)]
        self._staging = [t.pin_memory() for t in buffers] if pinned else buffers
        self._staged = torch.cuda.Event() if pinned else None

    def bucket(self, tokens: int) -> int | None:
        return bucket_for(tokens, self.sizes)

    def run(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, query_lens: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, pending) of the step, as model.residual returns them, the step's rows only, for its
        packed inputs on the host (token ids, positions, cache slots) and per-sequence lengths."""
        tokens = len(ids)
        size = self.bucket(tokens)
        self._query_lens = list(query_lens)
        key = (size, len(self._query_lens) == 1)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(*key)
            except Exception as exc:  # any op the capture cannot take: the step is still computed eagerly
                raise CaptureFailed(f"capturing the {size}-token prefill graphs failed: {type(exc).__name__}: {exc}") from exc
            self.graphs[key] = graph
        self._stage(graph, ids, positions, slots)
        out = self.attn_out[:size]
        for piece, qkv in zip(graph.pieces, graph.attentions + [None]):
            piece.replay()
            if qkv is not None:
                self._attend(out, *qkv)
        pending = None if graph.pending is None else graph.pending[0, :tokens]
        return graph.h[0, :tokens], pending

    def _stage(self, graph: _BucketGraph, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> None:
        """The step's inputs, padded (token 0, position 0, slot -1), into the graph's static inputs:
        padded on the host (pad_inputs) into the staging buffers and copied without waiting, so no
        pageable copy and no padding kernel holds the host before the replay (a 2048-token step
        spent 0.86 ms, profiled, between generate() and its first kernel). The buffers are rewritten
        only once the last step's copies out of them are done (an event: a prefill chunk that
        samples nothing does not end by waiting for the GPU)."""
        size = graph.ids.shape[0]
        if self._staged is not None:
            self._staged.synchronize()  # at once unless the last step's copies are still queued
        padded = pad_inputs(*(torch.from_numpy(a) for a in (ids, positions, slots)), size)
        for static, staging, value in zip((graph.ids, graph.positions, graph.slots), self._staging, padded):
            staging[:size].copy_(value)
            static.copy_(staging[:size], non_blocking=True)
        if self._staged is not None:
            self._staged.record()

    def _attend(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Causal attention of each sequence over its own tokens into out's first rows."""
        kv_ops.attend_new_tokens(q, k, v, torch.tensor(self._query_lens), out=out)

    def _attention_break(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Called by kv_ops.paged_attention in place of the attention while capturing: end this
        piece, run the attention eagerly (the warm-up's values), start the next piece."""
        graph = self._capturing
        graph.pieces[-1].capture_end()
        graph.attentions.append((q, k, v))
        out = self.attn_out[:graph.ids.shape[0]]
        self._attend(out, q, k, v)
        graph.pieces.append(self._begin())
        return out

    def _begin(self) -> torch.cuda.CUDAGraph:
        piece = torch.cuda.CUDAGraph()
        piece.capture_begin(pool=self.pool)
        if self.pool is None:
            self.pool = piece.pool()
        return piece

    def _context(self, graph: _BucketGraph, attention_break) -> StepContext:
        """The capture's step: all padding (nothing stored), one sequence of the bucket's tokens.
        Built before a capture begins: its host-to-device copies cannot be captured."""
        size = graph.ids.shape[0]
        return StepContext(is_prefill=True, slot_mapping=graph.slots,
                           block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
                           context_lens=torch.tensor([size], dtype=torch.int32, device=self.device),
                           query_lens=torch.tensor([size]), has_prefix=False, host_context_lens=[size],
                           attention_break=attention_break)

    def _forward(self, graph: _BucketGraph, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        set_context(ctx)
        try:
            return self.model.residual(graph.ids.unsqueeze(0), graph.positions.unsqueeze(0))
        finally:
            set_context(None)

    def _capture(self, size: int, whole: bool) -> _BucketGraph:
        """The bucket's graphs: one for the whole forward (whole: a step of one sequence), else one
        between every two attentions."""
        graph = _BucketGraph(torch.zeros(size, dtype=torch.long, device=self.device),
                             torch.zeros(size, dtype=torch.long, device=self.device),
                             torch.full((size,), -1, dtype=torch.int32, device=self.device))
        query_lens, self._query_lens = self._query_lens, [size]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(graph, self._context(graph, None))  # warm-up: kernel builds, buffers grown to this size
            ctx = self._context(graph, None if whole else self._attention_break)
            torch.cuda.synchronize(self.device)
            self._capturing = graph
            graph.pieces.append(self._begin())
            try:
                graph.h, graph.pending = self._forward(graph, ctx)
                graph.pieces[-1].capture_end()
            except Exception:
                with contextlib.suppress(Exception):  # end a capture still open; the first error is the one to see
                    graph.pieces[-1].capture_end()
                raise
            finally:
                self._capturing = None
                self._query_lens = query_lens
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph
