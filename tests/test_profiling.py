"""quad_engine.profiling: kernels filed under the op and the step that launched them."""

from quad_engine import profiling


def _range(name, ts, dur):
    return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}


def _launch(ts, correlation, api="cuda_runtime"):
    return {"cat": api, "name": "launch", "ts": ts, "args": {"correlation": correlation}}


def _kernel(name, dur, correlation=None, ts=None, **args):
    args = dict(args, **({"correlation": correlation} if correlation is not None else {}))
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": args}


def _back_to_back(events, start=1000.0, gap=0.5):
    """Give the kernels without a start one after another, as a stream runs them."""
    t = start
    for e in events:
        if e["cat"] == "kernel" and e["ts"] is None:
            e["ts"] = t
            t += e["dur"] + gap
    return events


def test_kernels_are_filed_under_the_innermost_op_and_their_step():
    events = [
        _range("quad_step::prefill", 0, 100), _range("quad_step::decode", 200, 100),
        _range("quad::quantize", 10, 30), _range("quad::hadamard", 15, 10),  # nested: innermost wins
        _range("quad::gemm", 210, 20),
        _launch(12, 1), _launch(20, 2, "cuda_driver"), _launch(35, 3), _launch(215, 4, "cuda_driver"),
        _launch(250, 5), _launch(400, 6),
        _kernel("elementwise", 3.0, 1), _kernel("main_kernel", 4.0, 2, grid=[8, 1, 1], block=[128, 1, 1]),
        _kernel("elementwise", 5.0, 3), _kernel("main_kernel", 6.0, 4, grid=[1792, 1, 1], block=[128, 1, 1]),
        _kernel("argmax", 1.0, 5), _kernel("outside", 2.0, 6), _kernel("replayed", 7.0),
    ]
    _back_to_back(events)
    rows = profiling.attribute(events)
    assert rows == {
        ("prefill", "quantize", "elementwise"): (8.0, 2),
        ("prefill", "hadamard", "tilelang grid(8, 1, 1) block(128, 1, 1)"): (4.0, 1),
        ("decode", "gemm", "tilelang grid(1792, 1, 1) block(128, 1, 1)"): (6.0, 1),
        ("decode", "-", "argmax"): (1.0, 1),
        ("-", "-", "outside"): (2.0, 1),
        ("-", "-", "replayed"): (7.0, 1),
    }
    parts = profiling.breakdown_by_op(events)
    # Idle: the 0.5 µs gaps between a step's kernels (two in the prefill, one in the decode step).
    assert parts["prefill_ms"] == {"quantize": 0.008, "hadamard": 0.004, "total": 0.012, "idle": 0.001}
    assert parts["decode_ms"] == {"gemm": 0.006, "other": 0.001, "total": 0.007, "idle": 0.0005}


def test_without_kernels_the_breakdown_is_host_time_of_the_outermost_ops():
    events = [_range("quad_step::decode", 0, 100), _range("quad_step::decode", 200, 100),
              _range("quad::quantize", 10, 30), _range("quad::hadamard", 15, 10), _range("quad::gemm", 210, 20)]
    parts = profiling.breakdown_by_op(events)["decode_ms"]
    assert parts == {"quantize": 0.015, "gemm": 0.01, "total": 0.1, "other": 0.1 - 0.025}


def test_a_kernel_launched_early_is_charged_only_past_the_previous_kernels_end():
    """Programmatic dependent launch: the attention kernel's blocks start 4 µs before the KV store
    ends and wait for it; those 4 µs are the store's. A kernel inside the busy time costs nothing."""
    events = [_range("quad_step::decode", 0, 100), _range("quad::kv_store", 10, 2), _range("quad::attention", 12, 2),
              _range("quad::gemm", 14, 2), _launch(11, 1), _launch(13, 2), _launch(15, 3), _launch(17, 4),
              _kernel("store", 10.0, 1, ts=1000.0), _kernel("attention", 20.0, 2, ts=1006.0),
              _kernel("gemm", 5.0, 3, ts=1030.0), _kernel("inside", 1.0, 4, ts=1031.0)]
    rows = profiling.attribute(events)
    assert rows[("decode", "kv_store", "store")] == (10.0, 1)
    assert rows[("decode", "attention", "attention")] == (16.0, 1)
    assert rows[("decode", "gemm", "gemm")] == (5.0, 1)
    assert rows[("decode", "-", "inside")] == (0.0, 1)
    total = profiling.breakdown_by_op(events)["decode_ms"]["total"]
    assert abs(total - 0.031) < 1e-12  # the busy time, not the 36 µs summed


def test_idle_is_the_devices_gaps_between_a_steps_kernels_summed_over_steps():
    """Two decode steps: the first's kernels back to back, then a 3 µs gap while the host launches;
    the second's kernel overlaps its predecessor (no gap). The 50 µs between the steps is no step's."""
    events = [_range("quad_step::decode", 0, 100), _range("quad_step::decode", 200, 100),
              _launch(10, 1), _launch(20, 2), _launch(30, 3), _launch(210, 4), _launch(220, 5),
              _kernel("a", 5.0, 1, ts=1000.0), _kernel("b", 5.0, 2, ts=1005.0), _kernel("c", 2.0, 3, ts=1013.0),
              _kernel("d", 4.0, 4, ts=1065.0), _kernel("e", 4.0, 5, ts=1067.0)]
    assert profiling.device_idle(events) == {"decode": 3.0}
    assert profiling.breakdown_by_op(events)["decode_ms"]["idle"] == 0.0015
