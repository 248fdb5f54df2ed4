"""Markdown tables of the latest results: `python benchmarks/table.py [CSV] [--ops [JSON] | --efficacy [JSON]] [--write README.md]`.

Default: reads ``benchmarks/results/e2e.csv`` (or CSV), keeps the most recent row of each (device,
case, impl), and prints one Markdown table per device, headed by the device, torch version, dates
and commits. ``--ops`` instead renders one run of the ops suite (``benchmarks/results/ops-cpu-latest.json``
or the JSON given): every row against the eager baseline except the small-CNN shapes, which stay in
the JSON and CSV. ``--efficacy`` renders one run of the efficacy benchmark (the newest
``benchmarks/results/efficacy-*-latest.json`` or the JSON given): one row per case, the mean over
seeds. ``--write FILE`` replaces the block between ``<!-- e2e-table:start -->`` and
``<!-- e2e-table:end -->`` (``ops-table`` for ``--ops``, ``efficacy-table`` for ``--efficacy``) in
FILE, so the README tables are regenerated, never hand-edited.
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
EFFICACY_START, EFFICACY_END = "<!-- efficacy-table:start -->", "<!-- efficacy-table:end -->"


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


def _signed(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _seconds(case: dict) -> tuple[str, bool, int]:
    """ "pretrain / protect / evaluate" means over seeds, ``*`` on a stage loaded from the cache
    (for any seed), ``†`` on an evaluation that reused cells; whether a ``*`` was set and how
    many cells were reused."""
    seeds = list(case["seeds"].values())
    parts, starred = [], False
    for stage in ("pretrain", "protect", "evaluate"):
        cached = any((m.get("cached") or {}).get(stage) for m in seeds)
        starred = starred or cached
        parts.append(_num(case["mean"]["seconds"][stage]) + ("*" if cached else ""))
    reused = sum((m.get("evaluation") or {}).get("cells_reused", 0) for m in seeds)
    if reused and not any((m.get("cached") or {}).get("evaluate") for m in seeds):
        parts[-1] += "†"
    return " / ".join(parts), starred, reused


def render_efficacy(result: dict) -> str:
    """The Markdown block for one efficacy run: one row per case, means over seeds."""
    if not result.get("cases"):
        raise ValueError("no cases in this efficacy result")
    env, config, evaluation = result["environment"], result["config"], result["evaluation"]
    budgets = list(next(iter(result["cases"].values()))["mean"]["best_gap"])
    heads = [f"e{b}" if b != "final" else "final" for b in budgets]
    n = evaluation.get("epochs")
    epochs = f"{n} epoch{'s' if n != 1 else ''}, " if n else ""
    out = [
        f"**{env['device']}**, torch {env['torch']}, {env['threads']} threads, "
        f"{env['date'][:10]}, commit {env['git_sha']}; config `{result['config_name']}` "
        f"({config['outer_steps']} outer steps, {'quick' if result['quick'] else 'full'}), "
        f"seeds {', '.join(map(str, result['seeds']))} (means shown); attacks: the quick grid, "
        f"{epochs}{evaluation['workers']} workers"
        f"{'' if evaluation['benign'] else ', no trainability check'}.",
        "Points of restricted test accuracy, protected minus scratch, best recipe (grid and "
        "search) at each epoch; AUC: mean accuracy over epochs 0..e; linear probe: final "
        "accuracy, protected minus scratch / minus normal. Bar: drop <= "
        f"{result['bar']['max_original_drop']:g} and best gap <= "
        f"{result['bar']['max_best_gap']:g} at every budget.",
        "",
        "| case | original acc % normal → protected (drop) | "
        + " | ".join(f"best Δ {h}" for h in heads)
        + " | AUC Δ "
        + " / ".join(heads)
        + " | linear probe Δ scratch / normal | seconds pretrain / protect / evaluate | bar |",
        "|---|---|" + "---:|" * len(heads) + "---|---|---|---|",
    ]
    any_starred, any_reused = False, False
    for name, case in result["cases"].items():
        m = case["mean"]
        orig = m["original_accuracy"]
        seconds, starred, reused = _seconds(case)
        any_starred, any_reused = any_starred or starred, any_reused or bool(reused)
        out.append(
            f"| {name} | {orig['normal']:.1f} → {orig['protected']:.1f} ({m['original_drop']:.1f}) | "
            + " | ".join(_signed(m["best_gap"][b]) for b in budgets)
            + " | "
            + " / ".join(_signed(m["auc_gap"][b]) for b in budgets)
            + f" | {_signed(m['linear_probe_gap_scratch'])} / {_signed(m['linear_probe_gap_normal'])}"
            + f" | {seconds} | {'pass' if case['bar']['passed'] else 'fail'} |"
        )
    notes = []
    if any_starred:
        notes.append("\\* from the cache: the seconds of the run that computed it.")
    if any_reused:
        notes.append(
            "† some cells reused from the cache (the normal and scratch arms are shared by every "
            "config): the seconds are this run's."
        )
    if notes:
        out += ["", " ".join(notes)]
    return "\n".join(out) + "\n"


def latest_efficacy_json() -> Path:
    """The newest ``benchmarks/results/efficacy-*-latest.json``."""
    found = sorted(
        (HERE / "results").glob("efficacy-*-latest.json"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise SystemExit(
            "no benchmarks/results/efficacy-*-latest.json; run benchmarks/run.py efficacy"
        )
    return found[-1]


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
    parser.add_argument(
        "--efficacy",
        nargs="?",
        type=Path,
        const=Path("latest"),
        help="render this efficacy JSON (default: the newest efficacy-*-latest.json)",
    )
    parser.add_argument("--write", type=Path, help="replace the marked block in this file")
    args = parser.parse_args(argv)
    if args.efficacy is not None:
        path = latest_efficacy_json() if args.efficacy == Path("latest") else args.efficacy
        block = render_efficacy(json.loads(path.read_text()))
        markers, what = (EFFICACY_START, EFFICACY_END), "efficacy"
    elif args.ops is not None:
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
