"""The piecewise prefill graphs' host side (quad_engine.prefill_graphs): buckets, padding, and the
attention break the capture hooks into kv_ops. The capture and replay themselves run on the GPU
(tests/test_engine_gpu.py)."""

import torch

from quad_engine import kv_ops, prefill_graphs
from quad_engine.context import StepContext, set_context


def test_buckets_cover_every_size_with_less_than_a_bucket_step_of_padding():
    sizes = prefill_graphs.buckets(2048)
    assert sizes[:4] == [16, 32, 64, 128] and sizes[-1] == 2048
    for tokens in range(1, 2049):
        size = prefill_graphs.bucket_for(tokens, sizes)
        assert size >= tokens
        assert size - tokens < (16 if tokens <= 16 else 128 if tokens > 128 else tokens)
    assert prefill_graphs.bucket_for(2049, sizes) is None
    assert prefill_graphs.buckets(100) == [16, 32, 64, 100]  # the engine's token budget is the last
    assert prefill_graphs.buckets(1000)[-2:] == [896, 1000]


def test_padding_rows_store_nothing():
    ids, positions = torch.tensor([5, 6, 7]), torch.tensor([10, 11, 12])
    slots = torch.tensor([40, 41, 42], dtype=torch.int32)
    pi, pp, ps = prefill_graphs.pad_inputs(ids, positions, slots, 8)
    assert pi.tolist() == [5, 6, 7, 0, 0, 0, 0, 0] and pp.tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert ps.tolist() == [40, 41, 42, -1, -1, -1, -1, -1] and ps.dtype == torch.int32


def test_a_capture_breaks_at_the_prefill_attention_over_new_tokens():
    """kv_ops.paged_attention hands a prefill's attention over its own tokens to the context's
    attention_break (the capture ends a piece there) with the round-tripped K / V; without one it
    computes it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 4, 16).half(), torch.randn(6, 2, 16).half(), torch.randn(6, 2, 16).half()
    query_lens = torch.tensor([4, 2])
    seen = []
    ctx = StepContext(True, torch.zeros(6, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                      torch.tensor([4, 2], dtype=torch.int32), query_lens, attention_break=lambda *a: seen.append(a) or "x")
    set_context(ctx)
    try:
        assert kv_ops.paged_attention(q, None, ctx.block_tables, ctx.context_lens, query_lens, True, (k, v),
                                      has_prefix=False) == "x"
    finally:
        set_context(None)
    assert len(seen) == 1 and seen[0][1] is k and seen[0][2] is v and torch.equal(seen[0][0], q)
    out = kv_ops.paged_attention(q, None, ctx.block_tables, ctx.context_lens, query_lens, True, (k, v), has_prefix=False)
    assert torch.equal(out, kv_ops.attend_new_tokens(q, k, v, query_lens))
    # the second sequence attends to its own two tokens only
    alone = kv_ops.attend_new_tokens(q[4:], k[4:], v[4:], torch.tensor([2]))
    assert torch.equal(out[4:], alone)
    # into a larger static buffer: the same rows, the rest untouched
    buf = torch.full((8, 4, 16), 7.0).half()
    got = kv_ops.attend_new_tokens(q, k, v, query_lens, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf[:6], out) and (buf[6:] == 7).all()


def _padded_step_against_the_plain_one(lens: list[int], size: int, whole: bool):
    """The prefill graphs' step, on the reference backend without the graphs themselves: the
    inputs padded to `size` (pad_inputs), the capture's context, and either attention over the
    whole padded sequence (a step of one sequence) or the attention break writing the real rows of
    a buffer whose padding rows hold garbage. Returns the real rows' (h, pending) and caches of the
    padded and the plain step, each on a fresh cache."""
    from quad_engine import kv_cache
    from quad_engine.prefill_graphs import PrefillGraphs, _BucketGraph
    from quad_engine.synthetic import synthetic_model

    model = synthetic_model("smollm2-135m", num_layers=2, vocab_size=512, mode="w4a4a8")
    gen = torch.Generator().manual_seed(0)
    tokens = sum(lens)
    ids = torch.randint(0, 512, (tokens,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([torch.arange(n) + 64 * i for i, n in enumerate(lens)]).int()  # a block of 64 each

    def fresh_cache():
        for layer, cache in zip(model.layers, kv_cache.allocate(model.cfg, 8, "cpu", 64)):
            layer.attn.kv_cache = cache
        return [t for layer in model.layers for t in layer.attn.kv_cache]

    with torch.no_grad():
        plain_cache = fresh_cache()
        ctx = StepContext(True, slots, torch.zeros(len(lens), 1, dtype=torch.int32),
                          torch.tensor(lens, dtype=torch.int32), torch.tensor(lens), has_prefix=False)
        set_context(ctx)
        try:
            h, pending = model.residual(ids[None], positions[None])
        finally:
            set_context(None)
        padded_cache = fresh_cache()
        graphs = PrefillGraphs(model, torch.device("cpu"), max_tokens=size)
        graphs.attn_out.normal_(generator=gen)  # stale rows: what earlier steps left there
        graph = _BucketGraph(*prefill_graphs.pad_inputs(ids, positions, slots, size))
        graphs._query_lens = list(lens)

        def attention_break(q, k, v):
            out = graphs.attn_out[:size]
            graphs._attend(out, q, k, v)
            return out
        ph, ppending = graphs._forward(graph, graphs._context(graph, None if whole else attention_break))
    return (h[0], pending[0]), (ph[0, :tokens], ppending[0, :tokens]), plain_cache, padded_cache


def _assert_same_step(plain, padded, plain_cache, padded_cache, rows_exact: float):
    """Rows equal but for a fraction (1 - rows_exact) of them, the caches alike, nothing stored for
    the padding. A padding row that reached a real one (attention past the causal edge, a stale
    buffer row) would change every row after it by O(1)."""
    for a, b in zip(plain, padded):
        assert torch.isfinite(b).all()
        exact = (a == b).all(dim=-1).float().mean()
        assert exact >= rows_exact, float(exact)
        assert float(((a.float() - b.float()).norm(dim=-1) / a.float().norm(dim=-1)).max()) < 0.15
    for a, b in zip(plain_cache, padded_cache):
        assert float((a != b).float().mean()) < 1e-3
    for a, b in zip(plain_cache[1::2], padded_cache[1::2]):  # scales and zeros: the same slots written
        assert torch.equal(a.ne(0).any(-1), b.ne(0).any(-1))


def test_a_padded_step_of_one_sequence_attends_over_the_whole_bucket_and_stores_only_its_tokens():
    # The CPU's SDPA sums the last rows' keys in another order at another length (1e-7), which the
    # activation quantizers turn into a whole-step flip in a few of those rows.
    _assert_same_step(*_padded_step_against_the_plain_one([45], 64, whole=True), rows_exact=0.9)


def test_a_padded_step_of_several_sequences_breaks_at_attention_and_stores_only_its_tokens():
    _assert_same_step(*_padded_step_against_the_plain_one([20, 7, 30], 64, whole=False), rows_exact=1.0)


def test_a_failed_capture_leaves_the_prefill_to_the_eager_path():
    """Where a bucket's graphs cannot be captured (here: no CUDA at all), the engine warns once,
    computes the step eagerly and runs later prefills eagerly: the same tokens as without graphs."""
    import warnings

    import pytest

    from quad_engine.engine import LLM
    from quad_engine.sampling import SamplingParams
    from quad_engine.synthetic import synthetic_model

    model = synthetic_model("smollm2-135m", num_layers=2, vocab_size=512)
    llm = LLM(model=model, device="cpu", num_blocks=16, block_size=16, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7] * 30]
    want = [o.token_ids for o in llm.generate(prompts, params)[0]]
    llm.use_cuda_graph = True  # prefills only (max_tokens=1): no decode graph is asked for
    with pytest.warns(UserWarning, match="prefill graphs failed"):
        got = [o.token_ids for o in llm.generate(prompts, params)[0]]
    assert got == want and llm.prefill_graphs_failed and not llm.prefill_graphs.graphs
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert [o.token_ids for o in llm.generate(prompts, params)[0]] == want
    assert not [w for w in later if "prefill graphs" in str(w.message)]  # eager, no second capture


def test_staged_inputs_are_the_padded_inputs():
    """PrefillGraphs._stage (host buffers copied into the graph's static inputs) pads as pad_inputs
    does, also after a longer step left its values in the buffers."""
    import numpy as np

    from quad_engine.prefill_graphs import PrefillGraphs, _BucketGraph
    from quad_engine.synthetic import synthetic_model

    graphs = PrefillGraphs(synthetic_model("smollm2-135m", num_layers=1), torch.device("cpu"), max_tokens=64)
    for tokens, size in ((40, 64), (5, 16)):
        ids, positions = np.arange(100, 100 + tokens), np.arange(7, 7 + tokens)
        slots = np.arange(3, 3 + tokens, dtype=np.int32)
        graph = _BucketGraph(torch.full((size,), 9), torch.full((size,), 9), torch.full((size,), 9, dtype=torch.int32))
        graphs._stage(graph, ids, positions, slots)
        want = prefill_graphs.pad_inputs(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(slots), size)
        for got, expected in zip((graph.ids, graph.positions, graph.slots), want):
            assert torch.equal(got, expected)
