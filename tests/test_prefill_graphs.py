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
    assert prefill_graphs.buckets(100) == [16, 32, 64]


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
