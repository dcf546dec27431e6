"""What a benchmark result must say about where it ran: versions, device and its measured copy
bandwidth, the code (git commit, marked -dirty when the tree differs, and a digest of the sources
that ran) and the kernel-variant switches in effect."""

from __future__ import annotations

import os
import subprocess
import time

import torch


def environment() -> dict:
    import platform

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        # A tree that differs from the commit says so: the commit alone would claim code it did not run.
        if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=10).stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"torch": torch.__version__, "python": platform.python_version(), "git_commit": commit or None,
           "source_digest": source_digest(), "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           # kernel-variant switches in effect (a result must say which code paths it measured)
           "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QUAD_")}}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
        copy.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            copy.clone()
        torch.cuda.synchronize()
        env["copy_gbps"] = 2 * copy.numel() * 10 / (time.perf_counter() - t0) / 1e9
    return env


def source_digest() -> str:
    """sha256 (first 16 hex digits) of the code that ran: every .py file of the engine, the kernels
    and the converter, by path. A copy of the tree whose git metadata is stale or absent still
    names its code: check out a commit and compare `python -c "from quad_engine.bench_env import
    source_digest; print(source_digest())"`."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(p for pkg in ("quad_engine", "kernels_tl", "converter") for p in (root / pkg).rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
