"""End-to-end latency of the engine's QUAD paths against its fp16 path and Hugging Face transformers.

Every system runs in the same process on the same device, one after the other (each freed before
the next is built): prefill latency (batch x prompt length), decode latency per step (batch x
context), and a throughput run. Times are medians of repeated, synchronized runs after a warm-up.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from quad_engine import kv_cache
from quad_engine.bench_env import environment
from quad_engine.engine import LLM
from quad_engine.sampling import SamplingParams
from quad_engine.synthetic import ARCHITECTURES, synthetic_model

SYSTEMS = ("quad-w4a4", "quad-w4a4a8", "fp16", "hf")
# Also accepted: quad-<mode>-unfused, the same model with QUAD_FUSE=0 (what the fused kernels save);
# quad-<mode>-head16, with the embedding and lm_head kept float16 (LLM(int8_head=False); the quad
# systems keep them as int8 rows, the engine's default).
EXTRA_SYSTEMS = ("quad-w4a4-unfused", "quad-w4a4a8-unfused", "quad-w4a4-head16", "quad-w4a4a8-head16")


@dataclass
class BenchPlan:
    arch: str = "llama-3-8b"
    layers: int | None = None
    overrides: dict = field(default_factory=dict)        # shape overrides (tests use tiny vocabularies)
    systems: tuple = SYSTEMS
    prefill: list = field(default_factory=lambda: [(1, 512), (1, 2048), (4, 2048), (16, 2048), (1, 8192)])
    decode: list = field(default_factory=lambda: [(1, 1024), (8, 1024), (32, 1024), (128, 1024), (1, 4096),
                                                  (32, 4096)])
    decode_steps: int = 32
    throughput_requests: int = 64
    repeats: int = 3
    device: str = "cuda"
    seed: int = 0
    checkpoint: str | None = None  # a packed checkpoint: system "quad" runs it instead of random weights


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _restart_peak(device) -> None:
    """Start measuring peak GPU memory afresh (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes(device) -> int:
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _engine_gb(llm: LLM, peak: int, batch: int, tokens: int) -> float:
    """GiB an engine needs for `batch` sequences of `tokens`: its measured peak with the KV cache
    counted at the blocks those sequences occupy, not at the pool the bench allocates for its
    largest shape (which would charge the fp16 engine four times what it charges QUAD)."""
    per_block = kv_cache.bytes_per_block(llm.cfg, llm.block_size)
    pool = llm.num_blocks * per_block
    return (peak - pool + batch * -(-tokens // llm.block_size) * per_block) / 2 ** 30


class _PeakMemory:
    """Peak GPU memory allocated while the block runs: bytes and GiB (None on the CPU)."""

    def __init__(self, device):
        self.device = device
        self.bytes = self.gb = None

    def __enter__(self):
        _restart_peak(self.device)
        return self

    def __exit__(self, *exc):
        if torch.device(self.device).type == "cuda":
            self.bytes = _peak_bytes(self.device)
            self.gb = self.bytes / 2 ** 30


def kv_blocks_for(plan: "BenchPlan", block_size: int) -> int:
    """KV-cache blocks for the plan's largest batch x context: every engine system gets this many,
    so that their peak memory compares at the same batch and context (the throughput run may
    preempt, alike for all)."""
    need = [b * -(-(t + 1) // block_size) for b, t in plan.prefill]
    need += [b * -(-(c + plan.decode_steps + 2) // block_size) for b, c in plan.decode]
    return max(need + [-(-1024 // block_size)])


def _hf_model(plan: BenchPlan, dtype):
    """A random transformers model of the architecture's shapes (the 'hf' and 'fp16' systems)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    s = dict(ARCHITECTURES[plan.arch], **plan.overrides)
    kw = dict(hidden_size=s["hidden_size"], num_hidden_layers=plan.layers or s["num_layers"],
              num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"],
              intermediate_size=s["intermediate_size"], vocab_size=s["vocab_size"], rms_norm_eps=s["rms_norm_eps"],
              max_position_embeddings=s["max_position_embeddings"], rope_theta=s["rope_theta"])
    config = Qwen2Config(**kw) if s["architecture"] == "qwen2" else LlamaConfig(**kw)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def _fusions(enabled: bool):
    """QUAD_FUSE for one system's runs (ops reads it at every call, graph captures included)."""
    saved = os.environ.get("QUAD_FUSE")
    os.environ["QUAD_FUSE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["QUAD_FUSE"]
        else:
            os.environ["QUAD_FUSE"] = saved


def _engine(plan: BenchPlan, system: str, max_len: int, max_seqs: int) -> LLM:
    from quad_engine.kv_cache import BLOCK_SIZE
    blocks = max(kv_blocks_for(plan, BLOCK_SIZE), -(-max_len // BLOCK_SIZE))
    common = dict(device=plan.device, max_model_len=max_len, max_num_seqs=max_seqs, num_blocks=blocks,
                  max_num_batched_tokens=max([8192] + [b * t for b, t in plan.prefill]))
    if system == "fp16":
        from quad_engine.models.fp16 import FP16ForCausalLM
        dtype = torch.float16 if torch.device(plan.device).type == "cuda" else torch.float32
        return LLM(model=FP16ForCausalLM(_hf_model(plan, dtype)), **common)
    if system == "quad":
        return LLM(plan.checkpoint, **common)
    mode = system.removeprefix("quad-").removesuffix("-unfused").removesuffix("-head16")
    model = synthetic_model(plan.arch, device=plan.device, seed=plan.seed, num_layers=plan.layers, mode=mode,
                            **plan.overrides)
    return LLM(model=model, int8_head=not system.endswith("-head16"), **common)


def _prompts(rng: random.Random, batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def _engine_runs(llm: LLM, plan: BenchPlan, vocab: int) -> dict:
    rng = random.Random(plan.seed)
    greedy = dict(temperature=0, ignore_eos=True)
    out = {"prefill": [], "decode": []}
    llm.generate([[1] * 8, [2] * 16], SamplingParams(max_tokens=4, **greedy))  # warm-up: first-call setup
    for batch, length in plan.prefill:
        prompts = _prompts(rng, batch, length, vocab)
        times = []
        with _PeakMemory(plan.device) as peak:
            for _ in range(plan.repeats + 1):  # the first run is the warm-up
                _sync(plan.device)
                t0 = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=1, **greedy))
                _sync(plan.device)
                times.append(time.perf_counter() - t0)
        out["prefill"].append({"batch": batch, "tokens": length, "ms": 1e3 * statistics.median(times[1:]),
                               "peak_gb": None if peak.bytes is None else _engine_gb(llm, peak.bytes, batch, length)})
    weights = weight_bytes(llm.model)
    for batch, context in plan.decode:
        prompts = _prompts(rng, batch, context, vocab)
        steps, decode_peak = [], 0
        for _ in range(plan.repeats):
            times = []

            def step_done(dt, is_prefill, times=times):
                # A long batch prefills in several steps (max_num_batched_tokens): decode time and
                # memory count from the step after the last of them, when the cache is full.
                if is_prefill:
                    _restart_peak(plan.device)
                else:
                    times.append(dt)

            llm.step_hook = step_done
            llm.generate(prompts, SamplingParams(max_tokens=plan.decode_steps + 1, **greedy))
            llm.step_hook = None
            decode_peak = max(decode_peak, _peak_bytes(plan.device))
            steps += times
        peak_gb = _engine_gb(llm, decode_peak, batch, context + plan.decode_steps + 1) if decode_peak else None
        kv = batch * (context + plan.decode_steps // 2) * kv_cache.bytes_per_block(llm.cfg, 1)
        out["decode"].append({"batch": batch, "context": context, "ms_per_step": 1e3 * statistics.median(steps),
                              "ms_per_step_iqr": _iqr_ms(steps), "peak_gb": peak_gb,
                              **_bandwidth(weights + kv, statistics.median(steps))})
    n = plan.throughput_requests
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(16, 256), **greedy) for _ in range(n)]
    if n:  # warm-up: the whole run once untimed, so every batch size it passes through is built and captured
        llm.generate(prompts, params)
    _sync(plan.device)
    t0 = time.perf_counter()
    outputs, stats = llm.generate(prompts, params)
    _sync(plan.device)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outputs)
    out["throughput"] = {"requests": n, "generated_tokens": generated, "s": seconds,
                         "tok_per_s": generated / seconds, "preemptions": stats.preemptions}
    # Where the time goes at every measured shape (a missed target needs its own breakdown): the
    # prefill phase of each prefill shape, the decode phase of each decode shape.
    out["breakdown"] = {"prefill": [], "decode": []}
    for batch, length in plan.prefill:
        parts = breakdown(llm, _prompts(rng, batch, length, vocab), 0)
        out["breakdown"]["prefill"].append({"batch": batch, "tokens": length, "ms": parts["prefill_ms"]})
    for batch, context in plan.decode:
        parts = breakdown(llm, _prompts(rng, batch, context, vocab), plan.decode_steps)
        out["breakdown"]["decode"].append({"batch": batch, "context": context, "ms": parts["decode_ms"]})
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the model's stored tensors: all of them but the embedding table
    (a step reads one row of it per token) and the RoPE frequencies."""
    skip = ("embed", "inv_freq", "rotary")
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors if not any(k in name for k in skip))


def _iqr_ms(seconds: list[float]) -> list[float] | None:
    """[first, third] quartile of per-step times in ms: the spread a median hides (A/B rows closer
    than it are not decisive)."""
    if len(seconds) < 2:
        return None
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return [1e3 * q1, 1e3 * q3]


def _bandwidth(nbytes: int, seconds: float) -> dict:
    """A decode step's bytes (weights + this batch's KV cache) and the rate it reads them at; the
    copy bandwidth measured in the same run is the roofline (environment.copy_gbps)."""
    return {"bytes_read": nbytes, "gbps": nbytes / seconds / 1e9 if seconds > 0 else None}


class _StepTimer:
    """A generate() streamer that stamps the time each token reaches the host. generate checks its
    stopping criteria on the host every step, so consecutive stamps are one synchronized step.
    after_prefill() runs once the first token is out."""

    def __init__(self, after_prefill=None):
        self.stamps: list[float] = []
        self.after_prefill = after_prefill

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 2 and self.after_prefill is not None:
            self.after_prefill()

    def end(self) -> None:
        pass

    def decode_steps(self) -> list[float]:
        # stamps[0]: the prompt; stamps[1]: the first token (prefill); then one per decode step.
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def breakdown(llm: LLM, prompts: list[list[int]], steps: int) -> dict:
    """ms per step by op (gemm, quantize, hadamard, attention, kv_store, other) for the prefill of
    `prompts` and the following `steps` decode steps, from one eager run under the profiler
    (quad_engine.profiling): the device time of every kernel (past the end of the kernels before
    it, see profiling.exclusive_durations), filed under the op that launched it;
    "other" is what no op launched (embedding, lm_head, sampling, the fp16 path's nn.Linear GEMMs).
    Eager so that kernels can be attributed (a replayed graph is one launch); a step's device time
    is the same either way. Without a GPU, host time of the ops."""
    from quad_engine import profiling

    graphs, llm.use_cuda_graph = llm.use_cuda_graph, False
    try:
        with profiling.annotated_trace() as events:
            llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 1))
    finally:
        llm.use_cuda_graph = graphs
    return profiling.breakdown_by_op(events)


def _hf_runs(plan: BenchPlan, vocab: int) -> dict:
    """transformers with SDPA and a static cache, as a user would run it."""
    dtype = torch.bfloat16 if torch.device(plan.device).type == "cuda" else torch.float32
    model = _hf_model(plan, dtype)
    rng = random.Random(plan.seed)
    out = {"prefill": [], "decode": []}
    with torch.inference_mode():
        for batch, length in plan.prefill:
            ids = torch.tensor(_prompts(rng, batch, length, vocab), device=plan.device)
            times = []
            with _PeakMemory(plan.device) as peak:
                for _ in range(plan.repeats + 1):
                    _sync(plan.device)
                    t0 = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1)  # the engines also compute last-token logits only
                    _sync(plan.device)
                    times.append(time.perf_counter() - t0)
            out["prefill"].append({"batch": batch, "tokens": length, "ms": 1e3 * statistics.median(times[1:]),
                                   "peak_gb": peak.gb})
        for batch, context in plan.decode:
            ids = torch.tensor(_prompts(rng, batch, context, vocab), device=plan.device)
            steps, decode_peak = [], 0
            for _ in range(plan.repeats):
                # Decode memory: from the first generated token on (the static cache is allocated for
                # exactly this batch and length).
                timer = _StepTimer(after_prefill=lambda: _restart_peak(plan.device))
                model.generate(ids, max_new_tokens=plan.decode_steps + 1, min_new_tokens=plan.decode_steps + 1,
                               do_sample=False, cache_implementation="static", pad_token_id=0, streamer=timer)
                decode_peak = max(decode_peak, _peak_bytes(plan.device))
                steps += timer.decode_steps()
            c = model.config
            kv = batch * (context + plan.decode_steps // 2) * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
            out["decode"].append({"batch": batch, "context": context, "ms_per_step": 1e3 * statistics.median(steps),
                                  "ms_per_step_iqr": _iqr_ms(steps),
                                  "peak_gb": decode_peak / 2 ** 30 if decode_peak else None,
                                  **_bandwidth(weight_bytes(model) + kv, statistics.median(steps))})
    del model
    return out


def run(plan: BenchPlan, progress=print, after_system=None) -> dict:
    """Measure every system of the plan. after_system(result), when given, is called after each
    system (measured or failed) so a caller can save what a run cut short has measured."""
    if plan.checkpoint:
        from quad_engine.config import QuadConfig
        vocab = QuadConfig.load(plan.checkpoint).vocab_size
    else:
        vocab = dict(ARCHITECTURES[plan.arch], **plan.overrides)["vocab_size"]
    max_len = max([t + 1 for _, t in plan.prefill] + [c + plan.decode_steps + 2 for _, c in plan.decode] + [800])
    max_seqs = max([b for b, _ in plan.prefill] + [b for b, _ in plan.decode] + [plan.throughput_requests])
    result = {"plan": {k: v for k, v in plan.__dict__.items()}, "environment": environment(), "systems": {}}
    for system in plan.systems:
        progress(f"{system}: building")
        if torch.device(plan.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if system == "hf":
                runs = _hf_runs(plan, vocab)
            else:
                with _fusions(not system.endswith("-unfused")):
                    llm = _engine(plan, system, max_len, max_seqs)
                    progress(f"{system}: measuring")
                    runs = _engine_runs(llm, plan, vocab)
                    del llm
        except Exception as e:  # one system that fails is reported; the others' measurements stand
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            progress(f"{system}: failed ({message})")
            result.setdefault("failed", {})[system] = message
            llm = None
            gc.collect()
            if after_system:
                after_system(result)
            continue
        if torch.device(plan.device).type == "cuda":
            runs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["systems"][system] = runs
        gc.collect()
        if torch.device(plan.device).type == "cuda":
            torch.cuda.empty_cache()
        if after_system:
            after_system(result)
    _add_ratios(result)
    return result


def _add_ratios(result: dict) -> None:
    systems = result["systems"]
    for name, runs in systems.items():
        for base in ("fp16", "hf"):
            if base == name or base not in systems:
                continue
            for kind, key in (("prefill", "ms"), ("decode", "ms_per_step")):
                for row, base_row in zip(runs[kind], systems[base][kind]):
                    row[f"speedup_vs_{base}"] = base_row[key] / row[key] if row[key] > 0 else None
