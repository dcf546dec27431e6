"""Where a step's time goes, by op: every GPU kernel filed under the `quad_engine.ops` call that
launched it, from one run under the torch profiler.

With `ops.ANNOTATE` set, each op runs in a profiler range "quad::<category>" and each engine step in
"quad_step::<prefill|decode>". A kernel's launch (a runtime or driver API call, linked to the kernel
by its correlation id) falls inside those ranges. The profiler's own tables cannot do this for the
TileLang kernels, which all carry the name main_kernel and launch through the driver API; here they
are told apart by their grid and block. Kernels launched outside any op (embedding, lm_head,
sampling) are filed under "-", and so is everything a replayed CUDA graph runs (one launch).

Device times, not synchronized wall times: the per-op synchronization a wall-clock breakdown needs
costs more than a decode step's kernels (tens of microseconds of host time per op). Each GPU event
is charged only for the time it extends the device's busy time past everything that started
before it: with programmatic dependent launch (kernels_tl.pdl) a kernel's blocks start while the
previous kernel runs and wait for it, and that wait is the previous kernel's time, not its own.
Without overlap this is each event's duration; summed, it is the busy time of the trace.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import tempfile
from pathlib import Path

import torch

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _ranges(events: list[dict], prefix: str) -> list[tuple[float, float, str]]:
    return sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"].removeprefix(prefix)) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix))


def _innermost(ranges: list, starts: list, t: float) -> str | None:
    """The label of the latest-starting range that is still open at time t."""
    i = bisect.bisect_right(starts, t) - 1
    while i >= 0 and ranges[i][1] < t:
        i -= 1
    return ranges[i][2] if i >= 0 else None


def exclusive_durations(events: list[dict]) -> dict[int, float]:
    """index in events -> µs the GPU event adds to the busy time of the events that started before it
    (its duration less its overlap with them)."""
    gpu = sorted((e["ts"], i) for i, e in enumerate(events) if e.get("cat") in GPU_CATEGORIES)
    out, busy_until = {}, float("-inf")
    for ts, i in gpu:
        end = ts + events[i].get("dur", 0)
        out[i] = max(0.0, end - max(ts, busy_until))
        busy_until = max(busy_until, end)
    return out


def attribute(events: list[dict]) -> dict[tuple[str, str, str], tuple[float, int]]:
    """(phase, op, kernel) -> (device µs, count) over a chrome trace's events: exclusive device time
    (see exclusive_durations)."""
    ops, steps = _ranges(events, "quad::"), _ranges(events, "quad_step::")
    op_starts, step_starts = [r[0] for r in ops], [r[0] for r in steps]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    exclusive = exclusive_durations(events)
    rows: dict[tuple[str, str, str], tuple[float, int]] = {}
    for index, e in enumerate(events):
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        args = e.get("args", {})
        name = e["name"]
        if name == "main_kernel":  # TileLang: the launch shape says which one
            name = f"tilelang grid{tuple(args.get('grid', ()))} block{tuple(args.get('block', ()))}"
        launch = launches.get(args.get("correlation"))
        phase = op = "-"
        if launch is not None:
            op = _innermost(ops, op_starts, launch) or "-"
            phase = _innermost(steps, step_starts, launch) or "-"
        key = (phase, op, name)
        t, n = rows.get(key, (0.0, 0))
        rows[key] = (t + exclusive[index], n + 1)
    return rows


def device_idle(events: list[dict]) -> dict[str, float]:
    """phase -> µs the GPU stood idle between the first and the last kernel of its steps (summed
    over the steps): where it waited for the host to launch the next kernel, or for a copy the host
    waited on. A step whose kernels run back to back has none."""
    steps = _ranges(events, "quad_step::")
    step_starts = [r[0] for r in steps]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    per_step: dict[tuple[float, str], list[tuple[float, float]]] = {}
    for e in events:
        launch = launches.get(e.get("args", {}).get("correlation")) if e.get("cat") in GPU_CATEGORIES else None
        if launch is None:
            continue
        i = bisect.bisect_right(step_starts, launch) - 1
        while i >= 0 and steps[i][1] < launch:
            i -= 1
        if i >= 0:
            per_step.setdefault((steps[i][0], steps[i][2]), []).append((e["ts"], e["ts"] + e.get("dur", 0)))
    out: dict[str, float] = {}
    for (_, phase), spans in per_step.items():
        spans.sort()
        out[phase] = out.get(phase, 0.0) + sum(gap for gap, _ in device_gaps(spans))
    return out


def device_gaps(spans: list[tuple[float, float]]) -> list[tuple[float, int]]:
    """(µs, i) for every stretch between the first start and the last end in which none of the
    (start, end) spans, sorted by start, ran: i is the span that ends the stretch."""
    gaps, busy_until = [], spans[0][0]
    for i, (start, end) in enumerate(spans):
        if start > busy_until:
            gaps.append((start - busy_until, i))
        busy_until = max(busy_until, end)
    return gaps


def cpu_op_times(events: list[dict]) -> dict[tuple[str, str], float]:
    """(phase, op) -> µs of host time in the outermost op ranges: the breakdown where no GPU runs."""
    ops, steps = _ranges(events, "quad::"), _ranges(events, "quad_step::")
    step_starts = [r[0] for r in steps]
    out: dict[tuple[str, str], float] = {}
    open_until = -1.0
    for start, end, op in ops:
        if start < open_until:  # nested in the previous op (e.g. swiglu_hadamard_quant -> hadamard_quant)
            continue
        open_until = end
        phase = _innermost(steps, step_starts, start) or "-"
        out[(phase, op)] = out.get((phase, op), 0.0) + (end - start)
    return out


def step_counts(events: list[dict]) -> dict[str, tuple[int, float]]:
    """phase -> (steps, µs of host time in them)."""
    out: dict[str, tuple[int, float]] = {}
    for start, end, phase in _ranges(events, "quad_step::"):
        n, t = out.get(phase, (0, 0.0))
        out[phase] = (n + 1, t + end - start)
    return out


@contextlib.contextmanager
def annotated_trace():
    """Profile the block with ops.ANNOTATE on; yields a list that holds the trace's events after it."""
    from torch.profiler import ProfilerActivity, profile

    from quad_engine import ops

    events: list[dict] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    ops.ANNOTATE = True
    try:
        with profile(activities=activities) as prof:
            yield events
            ops.device_sync()
    finally:
        ops.ANNOTATE = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events.extend(json.loads(path.read_text())["traceEvents"])


def breakdown_by_op(events: list[dict]) -> dict[str, dict[str, float]]:
    """"<phase>_ms" -> {op: ms per step, "total": ms per step} from an annotated trace: device
    time of the kernels when the trace has any (a GPU run), and "idle", the device's gaps between
    them (device_idle; not in the total: a step's device span is total + idle); else host time of
    the op ranges."""
    counts = step_counts(events)
    gpu = attribute(events)
    idle = device_idle(events)
    out = {}
    for phase, (steps, host_us) in counts.items():
        row: dict[str, float] = {}
        if any(e.get("cat") in GPU_CATEGORIES for e in events):
            for (ph, op, _), (us, _) in gpu.items():
                if ph == phase:
                    name = "other" if op == "-" else op
                    row[name] = row.get(name, 0.0) + us / 1e3 / steps
            row["total"] = sum(row.values())
            row["idle"] = idle.get(phase, 0.0) / 1e3 / steps
        else:
            for (ph, op), us in cpu_op_times(events).items():
                if ph == phase:
                    row[op] = us / 1e3 / steps
            row["total"] = host_us / 1e3 / steps
            row["other"] = row["total"] - sum(v for k, v in row.items() if k != "total")
        out[f"{phase}_ms"] = row
    return out
