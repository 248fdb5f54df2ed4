"""Markdown table of the latest end-to-end results: `python benchmarks/table.py [CSV] [--write README.md]`.

Reads ``benchmarks/results/e2e.csv`` (or CSV), keeps the most recent row of each (device, case,
impl), and prints one Markdown table per device, headed by the device, torch version, dates and
commits. ``--write FILE`` replaces the block between ``<!-- e2e-table:start -->`` and
``<!-- e2e-table:end -->`` in FILE, so the README table is regenerated, never hand-edited.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- e2e-table:start -->", "<!-- e2e-table:end -->"


def _num(value: str, digits: int = 0, suffix: str = "") -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(number):
        return "–"
    return f"{number:,.{digits}f}{suffix}"


def latest_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """device -> the most recent row of each (case, impl) of that device, in first-seen order."""
    by_device: dict[str, dict[tuple[str, str], dict]] = {}
    for row in rows:  # later rows (newer runs) replace earlier ones
        by_device.setdefault(row["device"], {})[(row["case"], row["impl"])] = row
    return {device: list(latest.values()) for device, latest in by_device.items()}


def _span(values: list[str]) -> str:
    unique = sorted(set(values))
    return unique[0] if len(unique) == 1 else f"{unique[0]} to {unique[-1]}"


def render(rows: list[dict]) -> str:
    """The Markdown block: one table per device."""
    out = []
    for device, latest in latest_rows(rows).items():
        out.append(
            f"**{device}**, torch {_span([r['torch'] for r in latest])}, "
            f"{_span([r['threads'] for r in latest])} threads, "
            f"{_span([r['date'][:10] for r in latest])}, commit "
            f"{_span([r['git_sha'] for r in latest])} (median of "
            f"{_span([r['repeats'] for r in latest])} outer steps after a warm-up step, variants "
            "interleaved; peak memory is what one outer step adds above the post-setup baseline)."
        )
        out.append("")
        out.append(
            "| case | impl | ms / outer step | reference ms | speedup | peak MiB | "
            "reference MiB | memory ratio |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in latest:
            missing = r["impl"] == "torchopt" and "not available" in r["ceiling"]
            out.append(
                f"| {r['case']} | {r['impl']}{' (not available)' if missing else ''} | "
                f"{_num(r['median_ms'])} | {_num(r['baseline_median_ms'])} | "
                f"{_num(r['speedup'], 2, '×')} | {_num(r['peak_mem_mb'])} | "
                f"{_num(r['baseline_peak_mem_mb'])} | {_num(r['memory_ratio'], 2)} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_into(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` with ``block``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: expected the markers {START} ... {END} around the e2e table")
    path.write_text(text[: start + len(START)] + "\n" + block + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=HERE / "results" / "e2e.csv")
    parser.add_argument("--write", type=Path, help="replace the marked block in this file")
    args = parser.parse_args(argv)
    with args.csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.csv}: no rows")
    block = render(rows)
    if args.write:
        write_into(args.write, block)
        print(f"wrote the e2e table into {args.write}")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
