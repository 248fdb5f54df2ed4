"""Markdown tables of the latest results: `python benchmarks/table.py [CSV] [--ops [JSON]] [--write README.md]`.

Default: reads ``benchmarks/results/e2e.csv`` (or CSV), keeps the most recent row of each (device,
case, impl), and prints one Markdown table per device, headed by the device, torch version, dates
and commits. ``--ops`` instead renders one run of the ops suite (``benchmarks/results/ops-cpu-latest.json``
or the JSON given): every row against the eager baseline except the small-CNN shapes, which stay in
the JSON and CSV. ``--write FILE`` replaces the block between ``<!-- e2e-table:start -->`` and
``<!-- e2e-table:end -->`` (``ops-table`` for ``--ops``) in FILE, so the README tables are
regenerated, never hand-edited.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- e2e-table:start -->", "<!-- e2e-table:end -->"
OPS_START, OPS_END = "<!-- ops-table:start -->", "<!-- ops-table:end -->"


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


def render_ops(records: list[dict]) -> str:
    """The Markdown block for one ops-suite run: the rows against the eager baseline."""
    rows = [r for r in records if r["baseline"] == "eager" and "small_cnn" not in r["case"]]
    if not rows:
        raise ValueError("no rows against the eager baseline in this ops run")
    copy = {round(r["gbps"] / r["roofline_frac"], 1) for r in rows if r.get("roofline_frac")}
    out = [
        f"**{_span([r['device'] for r in rows])}**, torch {_span([r['torch'] for r in rows])}, "
        f"triton {_span([r['triton'] for r in rows])}, {_span([r['threads'] for r in rows])} "
        f"threads, {_span([r['date'][:10] for r in rows])}, commit "
        f"{_span([r['git_sha'] for r in rows])}, measured copy bandwidth "
        f"{_span([f'{c} GB/s' for c in copy])} (median of {_span([r['repeats'] for r in rows])} "
        "interleaved repeats, fused and eager in the same run).",
        "",
        "| case | impl | ms | eager ms | speedup | GB/s | copy-bandwidth fraction | peak MiB "
        "| bytes and ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['impl']} | {_num(r['median_ms'], 3)} | "
            f"{_num(r['baseline_median_ms'], 3)} | {_num(r['speedup'], 2, '×')} | "
            f"{_num(r['gbps'], 1)} | {_num(r['roofline_frac'], 2)} | {_num(r['peak_mem_mb'])} | "
            f"{r.get('ceiling') or '–'} |"
        )
    return "\n".join(out) + "\n"


def write_into(path: Path, block: str, start_marker: str = START, end_marker: str = END) -> None:
    """Replace the block of ``path`` between the markers with ``block``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = path.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{path}: expected the markers {start_marker} ... {end_marker}")
    path.write_text(text[: start + len(start_marker)] + "\n" + block + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=HERE / "results" / "e2e.csv")
    parser.add_argument(
        "--ops",
        nargs="?",
        type=Path,
        const=HERE / "results" / "ops-cpu-latest.json",
        help="render this ops-suite JSON instead of the e2e CSV",
    )
    parser.add_argument("--write", type=Path, help="replace the marked block in this file")
    args = parser.parse_args(argv)
    if args.ops is not None:
        block = render_ops(json.loads(args.ops.read_text()))
        markers, what = (OPS_START, OPS_END), "ops"
    else:
        with args.csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise SystemExit(f"{args.csv}: no rows")
        block = render(rows)
        markers, what = (START, END), "e2e"
    if args.write:
        write_into(args.write, block, *markers)
        print(f"wrote the {what} table into {args.write}")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
