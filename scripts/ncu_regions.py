"""Where one kernel's instructions and warp stalls go, phase by phase: Nsight Compute's source page
(SASS, one row an instruction) cut at every block barrier (BAR), since the kernels here separate
their phases with __syncthreads (load, butterfly passes, reduction, codes).

    ncu --import REPORT --page source --csv --print-source sass > source.csv
    python scripts/ncu_regions.py source.csv --elements 29360128   # per element: 2048 x 14336

Prints, for the kernel and for each region: executed warp instructions (per element when
--elements is given, as thread instructions: x 32), stall samples, the most executed opcodes and
the most sampled stall reasons. Needs the report's SourceCounters section.
"""

from __future__ import annotations

import argparse
import collections
import csv
from dataclasses import dataclass, field


def _number(text: str) -> float:
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:  # "-" where a metric does not apply
        return 0.0


def _opcode(sass: str) -> str:
    """The opcode of a SASS line without its predicate and modifiers: "@!P0 LDS.U.128 R4, [R2]" -> "LDS"."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


@dataclass
class Region:
    instructions: float = 0.0
    samples: float = 0.0
    opcodes: collections.Counter = field(default_factory=collections.Counter)
    stalls: collections.Counter = field(default_factory=collections.Counter)


def regions(path: str) -> list[Region]:
    """The kernel's regions in program order; a region ends with (and includes) its barrier."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
    header = rows[start]
    col = {name: i for i, name in enumerate(header)}
    stall_cols = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    out = [Region()]
    for row in rows[start + 1:]:
        if len(row) < len(header):
            continue
        op = _opcode(row[col["Source"]])
        region = out[-1]
        region.instructions += _number(row[col["Instructions Executed"]])
        region.samples += _number(row[col["Warp Stall Sampling (All Samples)"]])
        region.opcodes[op] += _number(row[col["Instructions Executed"]])
        for name in stall_cols:
            region.stalls[name[len("stall_"):]] += _number(row[col[name]])
        if op == "BAR":
            out.append(Region())
    return [r for r in out if r.instructions or r.samples]


def report(found: list[Region], elements: int | None = None, top: int = 6) -> str:
    per = (lambda n: f"{32 * n / elements:.2f}/element") if elements else (lambda n: f"{n / 1e6:.3f}M")
    total = sum(r.instructions for r in found)
    samples = sum(r.samples for r in found) or 1.0
    lines = [f"kernel: {per(total)} instructions, {len(found)} regions"]
    for i, r in enumerate(found):
        ops = ", ".join(f"{op} {per(n)}" for op, n in r.opcodes.most_common(top))
        stalls = ", ".join(f"{name} {v / samples:.0%}" for name, v in r.stalls.most_common(top) if v)
        lines.append(f"region {i}: {per(r.instructions)}, {r.samples / samples:.0%} of the stall samples")
        lines.append(f"  opcodes: {ops}")
        lines.append(f"  stalls: {stalls}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source_csv", help="ncu --page source --csv --print-source sass output of one kernel")
    ap.add_argument("--elements", type=int, help="elements the launch processed: counts per element")
    ap.add_argument("--top", type=int, default=6, help="opcodes and stall reasons listed a region")
    args = ap.parse_args()
    print(report(regions(args.source_csv), args.elements, args.top))


if __name__ == "__main__":
    main()
