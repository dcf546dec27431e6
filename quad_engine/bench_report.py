"""quad-bench's report: the markdown tables and the PNG plot of a `quad_engine.bench.run` result."""

from __future__ import annotations


def code_line(env: dict) -> str:
    """The code that ran, as the header names it: the commit (short, with its -dirty mark where the
    tree differed) and the source digest, which names the code even where the git metadata of the
    tree that ran was stale."""
    commit = env.get("git_commit") or "?"
    short = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"commit {short}" + (f", sources {env['source_digest']}" if env.get("source_digest") else "")


def markdown(result: dict) -> str:
    systems = result["systems"]
    names = list(systems)
    env = result["environment"]
    lines = [f"# quad-bench: {result['plan']['arch']} on {env['device']} ({env['date']}, {code_line(env)})", "",
             "## Prefill latency (ms)", "",
             "| batch x tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, (batch, tokens) in enumerate(result["plan"]["prefill"]):
        lines.append(f"| {batch} x {tokens} | " + " | ".join(f"{systems[n]['prefill'][i]['ms']:.2f}" for n in names) + " |")
    lines += ["", "## Decode latency (ms / step: median, and the interquartile range of the steps)", "",
              "| batch x context | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def decode_cell(run: dict) -> str:
        iqr = run.get("ms_per_step_iqr")
        return f"{run['ms_per_step']:.3f}" + (f" ({iqr[0]:.3f}-{iqr[1]:.3f})" if iqr else "")

    for i, (batch, context) in enumerate(result["plan"]["decode"]):
        lines.append(f"| {batch} x {context} | " + " | ".join(decode_cell(systems[n]["decode"][i]) for n in names) + " |")
    copy = env.get("copy_gbps")
    if copy and all(r.get("gbps") for n in names for r in systems[n]["decode"]):
        lines += ["", f"## Decode read bandwidth (GB/s of weights + KV cache read per step; % of the "
                  f"{copy:.0f} GB/s copy roofline)", "", "| batch x context | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for i, (batch, context) in enumerate(result["plan"]["decode"]):
            lines.append(f"| {batch} x {context} | " + " | ".join(
                f"{systems[n]['decode'][i]['gbps']:.0f} ({100 * systems[n]['decode'][i]['gbps'] / copy:.0f}%)"
                for n in names) + " |")
    if any(r.get("peak_gb") is not None for n in names for r in systems[n]["decode"]):
        lines += ["", "## Peak GPU memory during decode (GiB: weights, KV cache for this batch x context, the "
                  "decode steps' activations; measured after the prefill, the engines' KV pool counted at the "
                  "blocks this batch occupies)", "", "| batch x context | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for i, (batch, context) in enumerate(result["plan"]["decode"]):
            lines.append(f"| {batch} x {context} | " + " | ".join(
                f"{systems[n]['decode'][i]['peak_gb']:.2f}" for n in names) + " |")
    engines = [n for n in names if "throughput" in systems[n]]
    if engines:
        lines += ["", "## Throughput (random prompt and output lengths, fixed seed)", "",
                  "| system | requests | generated tokens | s | tok/s | preemptions |", "|---|---|---|---|---|---|"]
        for n in engines:
            t = systems[n]["throughput"]
            lines.append(f"| {n} | {t['requests']} | {t['generated_tokens']} | {t['s']:.2f} | {t['tok_per_s']:.0f} "
                         f"| {t['preemptions']} |")
    lines += _breakdown_table(systems, engines, on_gpu=env["device"] != "cpu")
    if result.get("failed"):
        lines += ["", "## Systems that failed", ""] + [f"- {n}: {why}" for n, why in result["failed"].items()]
    return "\n".join(lines) + "\n"


def _breakdown_table(systems: dict, engines: list[str], on_gpu: bool) -> list[str]:
    """ms per step by op at every measured shape, from the profiled eager runs (see breakdown)."""
    lines = []
    cats = ["gemm", "quantize", "hadamard", "kv_store", "attention", "other", "total"] + (["idle"] if on_gpu else [])
    what_time = ("device time of the kernels each op launched; idle: the GPU's gaps between them, under the "
                 "profiler" if on_gpu else "host time of each op")
    for phase, size in (("prefill", "tokens"), ("decode", "context")):
        rows = [n for n in engines if systems[n].get("breakdown", {}).get(phase)]
        if not rows:
            continue
        for i, entry in enumerate(systems[rows[0]]["breakdown"][phase]):
            shape = f"{entry['batch']} x {entry[size]}"
            lines += ["", f"## {phase.capitalize()} time by op ({shape}; ms per step: {what_time}, eager run)",
                      "", "| system | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
            for n in rows:
                part = systems[n]["breakdown"][phase][i]["ms"]
                lines.append(f"| {n} | " + " | ".join(f"{part.get(c, 0.0):.3f}" for c in cats) + " |")
    return lines


def plot(result: dict, path) -> bool:
    """Decode ms/step vs batch (one line per system and context) and prefill ms vs batch x tokens."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in result["systems"].items():
        for context in sorted({r["context"] for r in runs["decode"]}):
            rows = [r for r in runs["decode"] if r["context"] == context]
            ax1.plot([r["batch"] for r in rows], [r["ms_per_step"] for r in rows], marker="o", label=f"{name} ctx {context}")
        ax2.plot([f"{r['batch']}x{r['tokens']}" for r in runs["prefill"]], [r["ms"] for r in runs["prefill"]],
                 marker="o", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms / decode step", title="decode")
    ax2.set(yscale="log", xlabel="batch x prompt tokens", ylabel="ms", title="prefill")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
