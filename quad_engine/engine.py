"""`LLM(checkpoint).generate(prompts, SamplingParams(...))`: the engine loop.

Each step the scheduler picks a batch (prefill of waiting sequences, or one decode token for every
running one), the model runs it as one packed sequence of tokens with the step's cache metadata in
a StepContext, and the sampler turns the last position of each sequence into its next token.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quad_engine import kv_cache, ops, prefill_graphs
from quad_engine.block_manager import BlockManager
from quad_engine.checkpoint import load_model
from quad_engine.config import QuadConfig
from quad_engine.context import StepContext, set_context
from quad_engine.sampling import Sampler, SamplingParams, argmax_rows, fastest_argmax_chunk, find_stop
from quad_engine.scheduler import Scheduler, Sequence, Status


@dataclass
class RequestOutput:
    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


@dataclass
class GenerateStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    preemptions: int = 0
    steps: list = field(default_factory=list)


@contextlib.contextmanager
def _step_range(is_prefill: bool):
    """When profiling (quad_engine.profiling): the step in a range "quad_step::<prefill|decode>"."""
    if not ops.ANNOTATE:
        yield
        return
    with torch.profiler.record_function("quad_step::" + ("prefill" if is_prefill else "decode")):
        yield


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LLM:
    """A packed QUAD checkpoint served from a paged int4 KV cache; with fp16=True, a Hugging Face
    model (directory, .gguf file or hub id) unquantized, from a paged float16 cache: the baseline.

    max_model_len: longest sequence (prompt + generation) accepted; defaults to the checkpoint's
    max_position_embeddings. The cache gets `num_blocks` blocks if given, else `kv_cache_gb`, else
    `gpu_memory_utilization` of the GPU after a warm-up step (on the CPU: 1 GiB).

    On a GPU (cuda_graph=True) decode steps replay one CUDA graph per batch bucket, captured at
    start-up, and a QUAD model's prefills of up to 2048 tokens replay graphs captured on a token
    bucket's first use (quad_engine.prefill_graphs); cuda_graph=False runs every step eagerly.
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
                 num_blocks: int | None = None, kv_cache_gb: float | None = None,
                 gpu_memory_utilization: float = 0.9, block_size: int = kv_cache.BLOCK_SIZE, fp16: bool = False,
                 model=None, tokenizer=None, cuda_graph: bool = True, int8_head: bool = True):
        """`model` (with `tokenizer`, or None for token-id prompts only) instead of a checkpoint:
        e.g. quad_engine.synthetic models for the bench. int8_head (default): keep a QUAD model's
        embedding and lm_head as int8 rows (QuadForCausalLM.use_int8_head: half their memory, no
        measurable perplexity cost, docs/results.md); False keeps the checkpoint's float16 tables."""
        from transformers import AutoTokenizer

        self.device = pick_device(device)
        if model is not None:
            self.model, self.tokenizer = model.to(self.device), tokenizer
        elif fp16:
            from quad_engine.models.fp16 import load_fp16_model
            self.model, self.tokenizer = load_fp16_model(checkpoint, self.device)
        else:
            self.model = load_model(checkpoint, self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.cfg = self.model.cfg
        if int8_head and isinstance(self.cfg, QuadConfig):
            self.model.use_int8_head()
        # Decode batch buckets (1, 2, 4, 8, 16, 32, 48, 64, ... up to max_num_seqs): CUDA graphs on a GPU.
        self.decode_buckets = sorted({min(b, max_num_seqs) for b in [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))})
        if self.device.type == "cuda" and isinstance(self.cfg, QuadConfig):
            self._prebuild_gemms(max_num_batched_tokens)
        self.max_model_len = max_model_len or self.cfg.max_position_embeddings
        self.model.precompute_rope(self.max_model_len)
        self.block_size = block_size
        self._table_width = -(-self.max_model_len // block_size)  # decode block tables: room for any sequence
        self._input_buffers: dict[tuple[int, int], torch.Tensor] = {}  # see _decode_inputs
        if num_blocks is None:
            if kv_cache_gb is not None:
                budget = int(kv_cache_gb * 2 ** 30)
            elif self.device.type == "cuda":
                self._warm_up(max_num_batched_tokens)
                budget = kv_cache.gpu_budget(self.device, gpu_memory_utilization)
            else:
                budget = 2 ** 30
            num_blocks = kv_cache.blocks_for_budget(self.cfg, budget, block_size)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {num_blocks * block_size} tokens, fewer than max_model_len "
                             f"{self.max_model_len}: give it more memory or lower max_model_len")
        self.num_blocks = num_blocks
        for layer, cache in zip(self.model.layers, kv_cache.allocate(self.cfg, num_blocks, self.device, block_size)):
            layer.attn.kv_cache = cache
        self.block_manager = BlockManager(num_blocks, block_size)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   eos if eos is not None else -1)
        self.sampler = Sampler()
        self._ids = itertools.count()
        self.logits_hook = None  # called as hook(seqs, logits) every step (tests, debugging)
        self.use_cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graphs: dict[int, tuple] = {}
        self.graph_pool = None
        self.prefill_graphs = None  # created on the first prefill that can use them
        self.prefill_graphs_failed = False  # a capture failed: prefills run eagerly
        self.step_hook = None    # called as hook(seconds, is_prefill) after every step (the bench)
        if self.use_cuda_graph:
            self.capture_graphs()

    @torch.inference_mode()  # as every step runs (_run): the graphs' static tensors are inference tensors
    def capture_graphs(self, progress: bool = True) -> None:
        """Capture the decode step of every batch bucket now, as vLLM does at start-up: kernel
        builds and captures then never land inside a request's decode (they take seconds)."""
        from tqdm import tqdm

        if isinstance(self.cfg, QuadConfig):
            self._prebuild_attention()
            self._prebuild_quantizers()
        todo = [size for size in self.decode_buckets if size not in self.graphs]
        for size in tqdm(todo, desc="capturing CUDA graphs", disable=not progress or not todo, file=sys.stderr,
                         leave=False):
            self.graphs[size] = self._capture(size)

    def _warm_up(self, tokens: int) -> None:
        """One full-recompute forward at the largest step size, so the cache is sized after the peak
        activation memory is known."""
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(1, min(tokens, self.cfg.max_position_embeddings), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model.hidden(ids)
        torch.cuda.synchronize(self.device)

    def _prebuild_gemms(self, max_tokens: int) -> None:
        """Compile, in parallel, every GEMM variant the decode buckets and prefills will use (TileLang
        builds a kernel on first use of a shape; one at a time that is minutes for a large model)."""
        try:
            from kernels_tl import gemm_dispatch
        except ImportError:
            return
        linears, gate_ups = {}, {}
        for layer in self.model.layers:
            for w in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
                if w.qweight is not None and ops._gemm_supports(w):
                    rank = 0 if w.w_out is None else w.w_out.shape[1]
                    key = (w.qweight.shape[0], w.qweight.shape[1] * 2, rank, w.bias is not None)
                    linears[key] = None
                    if w is layer.mlp.gate_up:
                        gate_ups[key] = None
        sizes = sorted(set(self.decode_buckets) | {65, min(1024, max_tokens)})
        gemm_dispatch.prebuild([(m, n, k, rank, bias, "float16") for n, k, rank, bias in linears for m in sizes],
                               swiglu_problems=[(m, *key) for key in gate_ups for m in sizes])
        if getattr(self.model, "head_int8", False):
            ops.prebuild_head(self.model, self.decode_buckets)

    def _prebuild_quantizers(self) -> None:
        """Compile in parallel the quantizer kernels of every decode bucket and of a long prefill."""
        if ops.use_kernels(torch.empty(0, device=self.device)):
            ops.prebuild_quantizers(self.cfg, self.decode_buckets + [self.scheduler.max_num_batched_tokens],
                                    int8_head=getattr(self.model, "head_int8", False))

    def _prebuild_attention(self) -> None:
        """Compile in parallel the decode attention variant of every bucket (its split count
        depends on the batch size), instead of one at a time inside the captures."""
        from quad_engine import kv_ops, ops
        try:
            from kernels_tl import kv_attention
        except ImportError:
            return
        cache = self.model.layers[0].attn.kv_cache
        if cache is None or not ops.use_kernels(cache[0]) or not kv_ops._kv_kernels_support(cache):
            return
        cfg, block = self.cfg, cache[0].shape[2]
        grids = [(size, kv_attention.decode_splits(size, cfg.num_kv_heads, block * self._table_width))
                 for size in self.decode_buckets]
        kv_attention.prebuild_decode(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, grids, block)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        """The step's next token of every sequence; None for a prefill chunk that is not its
        sequence's last (nothing is sampled for it, so a seeded request's draws do not depend on
        how its prompt was chunked)."""
        logits, greedy = (self._prefill_logits(seqs), None) if is_prefill else self._decode_logits(seqs)
        if self.logits_hook is not None:
            self.logits_hook(seqs, logits)
        done = [i for i, seq in enumerate(seqs) if seq.status == Status.RUNNING]
        if not done:
            return [None] * len(seqs)
        if len(done) < len(seqs):  # decode steps never get here: no row gather on the hot path
            logits, greedy = logits[done], None if greedy is None else greedy[done]
        tokens = iter(self.sampler.sample(logits, [seqs[i].params for i in done],
                                          [seqs[i].generator for i in done], greedy).tolist())
        return [next(tokens) if seq.status == Status.RUNNING else None for seq in seqs]

    def _forward(self, ctx: StepContext, ids: torch.Tensor, positions: torch.Tensor,
                 last: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Logits of the step's rows `last` (None: every row, as decode steps take them: no gather)."""
        set_context(ctx)
        try:
            h, pending = self.model.residual(ids.unsqueeze(0), positions.unsqueeze(0))
        finally:
            set_context(None)
        return self._logits(h[0], None if pending is None else pending[0], last)

    def _logits(self, h: torch.Tensor, pending: torch.Tensor | None, last: torch.Tensor | slice | None) -> torch.Tensor:
        if last is not None:  # the step's last rows only (a prefill)
            h, pending = h[last], None if pending is None else pending[last]
        return self.model.head_logits(h, pending)

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        # Per-token inputs by array ops on the host, not per-token Python (a 16 x 2048 prefill
        # spent ~20 ms building them as lists, and torch.tensor of a list is slower than numpy's).
        ids, positions, slots, query_lens, ends = [], [], [], [], []
        bs = self.block_manager.block_size
        tables = [self.block_manager.block_table(seq.seq_id) for seq in seqs]
        for seq, table in zip(seqs, tables):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            if end > len(table) * bs:
                raise IndexError(f"sequence {seq.seq_id} has blocks for {len(table) * bs} tokens, not {end}")
            pos = np.arange(start, end)
            ids.append(np.array(seq.token_ids[start:end], dtype=np.int64))
            positions.append(pos)
            slots.append(np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            query_lens.append(end - start)
            ends.append(end)
        width, dev = max(len(t) for t in tables), self.device
        ids, positions, slots = np.concatenate(ids), np.concatenate(positions), np.concatenate(slots).astype(np.int32)
        has_prefix = any(seq.num_cached_tokens > 0 for seq in seqs)
        # Each sequence's last row; of one sequence a view, no index tensor to copy to the device.
        last = slice(len(ids) - 1, None) if len(seqs) == 1 else torch.from_numpy(np.cumsum(query_lens) - 1).to(dev)
        graphs = self._prefill_graphs_for(has_prefix, len(ids))
        if graphs is not None:
            try:
                return self._logits(*graphs.run(ids, positions, slots, query_lens), last)
            except prefill_graphs.CaptureFailed as exc:
                warnings.warn(f"{exc}; prefills run eagerly from now on", stacklevel=2)
                self.prefill_graphs_failed = True
        ids, positions = torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev)
        ctx = StepContext(
            is_prefill=True,
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ends, dtype=torch.int32, device=dev),
            query_lens=torch.tensor(query_lens, dtype=torch.long),
            has_prefix=has_prefix,
            host_context_lens=ends)
        return self._forward(ctx, ids, positions, last)

    def _prefill_graphs_for(self, has_prefix: bool, tokens: int):
        """The piecewise prefill graphs when this step can replay them (quad_engine.prefill_graphs):
        a QUAD model on CUDA with graphs on, no cached prefix, at most the largest bucket's tokens."""
        if not (self.use_cuda_graph and isinstance(self.cfg, QuadConfig) and prefill_graphs.enabled()):
            return None
        if self.prefill_graphs_failed:
            return None
        if has_prefix:
            return None
        if self.prefill_graphs is None:
            self.prefill_graphs = prefill_graphs.PrefillGraphs(
                self.model, self.device, min(prefill_graphs.MAX_TOKENS, self.scheduler.max_num_batched_tokens),
                self.graph_pool)
        return self.prefill_graphs if self.prefill_graphs.bucket(tokens) is not None else None

    # Decode runs at a fixed batch size (the next bucket up) so that each bucket's step can be
    # captured once as a CUDA graph and replayed: padding rows have slot -1 (nothing is stored), an
    # all-zero block table and a context of 1, and their logits are dropped.

    def _bucket(self, batch: int) -> int | None:
        return next((b for b in self.decode_buckets if b >= batch), None) if self.decode_buckets else None

    def _decode_inputs(self, seqs: list[Sequence], size: int, width: int) -> torch.Tensor:
        """The step's inputs as one int32 host tensor (one copy to the device): ids, positions,
        slots and context lengths [size] each, then the block tables [size, width] (see _views).
        Padding rows: token 0 at position 0, slot -1 (nothing stored), length 1, an all-zero table.

        Filled in place into a buffer kept per shape (pinned on a GPU), a few microseconds a
        sequence: the GPU waits for this every step. Reusing it is safe because a step reads its
        tokens back before the next step fills it, so no copy from it is still in flight."""
        key = (size, width)
        buf = self._input_buffers.get(key)
        if buf is None:
            buf = torch.empty(4 * size + size * width, dtype=torch.int32)
            buf = self._input_buffers[key] = buf.pin_memory() if self.device.type == "cuda" else buf
        arr = buf.numpy()
        head, tables = arr[:4 * size].reshape(4, size), arr[4 * size:].reshape(size, width)
        n = len(seqs)
        lens = [seq.num_tokens for seq in seqs]
        slot = self.block_manager.slot
        head[:, :n] = ([seq.last_token_id for seq in seqs], [t - 1 for t in lens],
                       [slot(seq.seq_id, t - 1) for seq, t in zip(seqs, lens)], lens)
        head[:, n:] = ((0,), (0,), (-1,), (1,))
        tables.fill(0)
        for row, seq in zip(tables, seqs):
            table = self.block_manager.block_table(seq.seq_id)
            row[:len(table)] = table
        return buf

    @staticmethod
    def _views(packed: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, lens, tables) of a packed input: contiguous views."""
        ids, positions, slots, lens = (packed[i * size:(i + 1) * size] for i in range(4))
        return ids, positions, slots, lens, packed[4 * size:].view(size, -1)

    def _decode_logits(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, their argmax or None): a graphed step computes the argmax inside its graph."""
        size = self._bucket(len(seqs)) or len(seqs)
        if self.use_cuda_graph and size in self.decode_buckets:
            logits, greedy = self._graph_replay(size, seqs)
            return logits[: len(seqs)], greedy[: len(seqs)]
        # Tables as wide as a captured graph's: the attention kernel picks its context split from
        # the width, so eager and graphed steps then sum in the same order.
        packed = self._decode_inputs(seqs, size, self._table_width).to(self.device, non_blocking=True)
        ids, positions, slots, lens, tables = self._views(packed, size)
        ctx = StepContext(False, slots, tables, lens, torch.ones(size, dtype=torch.long))
        return self._forward(ctx, ids, positions)[: len(seqs)], None

    def _graph_replay(self, size: int, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the step's inputs into the bucket's static buffer and replay its graph (captured on
        first use; all buckets share one memory pool). The host buffer is pinned and the copy
        asynchronous: the previous step's tokens were read back before, so nothing still uses it."""
        entry = self.graphs.get(size)
        if entry is None:
            entry = self.graphs[size] = self._capture(size)
        packed, graph, logits, greedy = entry
        packed.copy_(self._decode_inputs(seqs, size, self._table_width), non_blocking=True)
        graph.replay()
        return logits, greedy

    def _capture(self, size: int):
        # Every tensor the graph reads must outlive it (a local would be freed and its memory
        # reused under the replay): the packed inputs (all padding rows to start with) are kept
        # with the graph.
        packed = self._decode_inputs([], size, self._table_width).to(self.device)
        ids, positions, slots, lens, tables = self._views(packed, size)
        ctx = StepContext(False, slots, tables, lens, torch.ones(size, dtype=torch.long))
        logits = self._forward(ctx, ids, positions)  # warm-up: lazy buffers, kernel builds
        # The greedy tokens inside the graph (device time only, in the form fastest here): torch's
        # argmax of one 128k-wide row alone took 41 µs, ~2% of a batch-1 step.
        chunk = fastest_argmax_chunk(size, logits.shape[-1], self.device)  # has run each form once
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._forward(ctx, ids, positions)
            greedy = argmax_rows(logits, chunk)
        self.graph_pool = graph.pool()
        return packed, graph, logits, greedy

    def _decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ API

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 on_token=None) -> tuple[list[RequestOutput], GenerateStats]:
        """Generate for every prompt (text, or token ids); `on_token(index, text_delta)` streams."""
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str) and self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            seq = Sequence(next(self._ids), token_ids, p)
            seq.generator = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            self.scheduler.add(seq)  # raises ValueError for empty or too-long prompts
            seqs.append(seq)
        stats, emitted = GenerateStats(), [""] * len(seqs)
        needs_text = on_token is not None or any(p.stop for p in params)
        index = {seq.seq_id: i for i, seq in enumerate(seqs)}
        while self.scheduler.has_unfinished():
            batch, is_prefill = self.scheduler.schedule()
            t0 = time.perf_counter()
            with _step_range(is_prefill):
                tokens = self._run(batch, is_prefill)
            self.scheduler.postprocess(batch, tokens)
            dt = time.perf_counter() - t0  # the step ends with the tokens on the host: synchronized
            if self.step_hook is not None:
                self.step_hook(dt, is_prefill)
            if is_prefill:
                stats.prefill_s += dt
            else:
                stats.decode_s += dt
                stats.decode_tokens += len(batch)
            for seq in batch if needs_text else ():  # detokenize per step only for stop strings / streaming
                i = index[seq.seq_id]
                text = self._decode(seq.output_token_ids)
                stop_at = find_stop(text, seq.params.stop)
                if stop_at is not None and not seq.is_finished:
                    self.scheduler.finish(seq, "stop")
                    text = text[:stop_at]
                if on_token is not None and len(text) > len(emitted[i]) and text.startswith(emitted[i]):
                    on_token(i, text[len(emitted[i]):])
                emitted[i] = text
        stats.prefill_tokens = sum(len(seq.prompt_token_ids) for seq in seqs)
        outputs = []
        for seq, prompt in zip(seqs, prompts):
            text = emitted[index[seq.seq_id]] if needs_text else self._decode(seq.output_token_ids)
            outputs.append(RequestOutput(prompt if isinstance(prompt, str) else self._decode(prompt),
                                         seq.prompt_token_ids, list(seq.output_token_ids), text, seq.finish_reason))
        stats.preemptions = self.scheduler.num_preemptions
        return outputs, stats
