"""summary.json of a benchmarks/gpu/run.sh run: every step's and every check's verdict.

    python benchmarks/gpu/summarize.py --logs LOGDIR --out OUTDIR --mode gpu|dry-run
        --started EPOCH_S --budget S

Run by run.sh after every step (so a run killed from outside still leaves the verdicts so far)
and once more at the end. Reads what the steps left:

    LOGDIR/steps.tsv         one line per step: name, verdict, exit code, seconds, limit, command,
                             reason (run.sh writes it)
    LOGDIR/environment.json  the environment step's checks (environment.py)
    OUTDIR/ops.json          the smoke step's checks (smoke.py)
    LOGDIR/tests.xml         the GPU tests' JUnit report; when missing (the step was killed), the
                             verbose pytest log LOGDIR/tests.log is parsed instead
    OUTDIR/e2e.json          the quick e2e benchmark's records (benchmarks/run.py e2e --json)

Verdicts: passed, failed, timed_out, skipped (every non-passed one carries its error text or
reason). A smoke check the plan names but the smoke did not record is reported as skipped with
the smoke step's own verdict as the reason, so the summary always lists the whole plan. The
overall verdict is "passed" when nothing failed or timed out.

Standard library only: it must run where torch does not import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smoke  # noqa: E402 - the plan (standard library only at import)

STEP_ORDER = ("environment", "build", "smoke", "tests", "e2e")
ERROR_CHARS = 2000


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, chars: int = ERROR_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def read_steps(logs: Path) -> list[dict]:
    steps = []
    try:
        lines = (logs / "steps.tsv").read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 7:
            continue
        name, verdict, rc, seconds, limit, command, reason = parts[:7]
        step = {
            "name": name,
            "verdict": verdict,
            "rc": int(rc) if rc.lstrip("-").isdigit() else None,
            "seconds": float(seconds) if seconds else None,
            "limit_s": int(limit) if limit.isdigit() else None,
            "command": command,
            "log": f"{name}.log",
        }
        if verdict != "passed":
            step["error"] = reason or _tail(logs / f"{name}.log")
        steps.append(step)
    return steps


def _short(text, chars=ERROR_CHARS):
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= chars else "..." + text[-chars:]


def smoke_checks(out: Path, mode: str, step: dict | None) -> tuple[list[dict], dict]:
    """Every planned smoke check, with the verdict ops.json recorded (or why there is none)."""
    doc = _read_json(out / "ops.json") or {}
    recorded = {c["name"]: c for c in doc.get("checks", [])}
    checks = []
    why_missing = (
        "the smoke step did not run"
        if step is None
        else f"not recorded: the smoke step {step['verdict']} ({_short(step.get('error'), 300)})"
    )
    names = [spec["name"] for spec in smoke.build_plan(mode == "dry-run")]
    names += [n for n in recorded if n not in set(names)]  # re-runs without launch blocking
    for name in names:
        c = recorded.get(name)
        if c is None or c.get("verdict") == "pending":
            checks.append(
                {"name": name, "step": "smoke", "verdict": "skipped", "error": why_missing}
            )
            continue
        record = {
            "name": name,
            "step": "smoke",
            "verdict": c["verdict"],
            "seconds": c.get("seconds"),
        }
        if c.get("error"):
            record["error"] = _short(c["error"])
        worst = _worst(c.get("metrics"))
        if worst:
            record["worst"] = worst
        checks.append(record)
    return checks, doc.get("header", {})


def _worst(metrics) -> dict | None:
    """The largest tolerance ratio / relative errors over a check's outputs (ops.json has all)."""
    if not isinstance(metrics, dict):
        return None
    if "per_step" in metrics:
        steps = metrics["per_step"] or [{}]
        return {
            "meta_grad_rel_l2": max(s.get("meta_grad_rel_l2", 0.0) for s in steps),
            "loss_rel_err": max(s.get("loss_rel_err", 0.0) for s in steps),
        }
    outputs = [m for m in metrics.values() if isinstance(m, dict) and "tol_ratio" in m]
    if not outputs:
        return None
    return {
        "tol_ratio": max(m["tol_ratio"] for m in outputs),
        "rel_l2": max(m.get("rel_l2", 0.0) for m in outputs),
        "max_abs_over_max_ref": max(m.get("max_abs_over_max_ref", 0.0) for m in outputs),
    }


def build_checks(header: dict, mode: str, smoke_step: dict | None) -> list[dict]:
    """What the build left, read off the smoke worker's header: extension and backends."""
    if not header or "available_backends" not in header:
        why = header.get("error") if header else None
        reason = why or "no smoke worker reported the backends" + (
            f" (smoke step {smoke_step['verdict']})" if smoke_step else ""
        )
        return [{"name": "build/backends", "step": "build", "verdict": "skipped" if not why else "failed",
                 "error": _short(reason)}]  # fmt: skip
    available, unavailable = header["available_backends"], header.get("unavailable_backends", {})
    checks = []
    wanted = ("cpu", "triton") if mode == "dry-run" else ("cuda", "triton")
    for name in wanted:
        record = {"name": f"build/backend_{name}", "step": "build"}
        if name in available:
            record.update(verdict="passed", detail=available[name])
        else:
            # A dry run may run without the compiled extension (SOPHON_FAST_NO_EXT=1 installs);
            # on the GPU every backend is what the run exists to check.
            record.update(verdict="skipped" if mode == "dry-run" else "failed",
                          error=unavailable.get(name, "not reported"))  # fmt: skip
        checks.append(record)
    for record in checks:  # where the compiled code came from (the CUDA part may be separate)
        if record["name"] in ("build/backend_cpu", "build/backend_cuda"):
            record["extension"] = header.get("extension")
            record["extension_with_cuda"] = header.get("extension_with_cuda")
    return checks


_RESULT = re.compile(
    r"(?:\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+))"
    r"|(?:^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))"
)
_VERDICT = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped",
            "XFAIL": "skipped", "XPASS": "passed"}  # fmt: skip


def test_checks(logs: Path, step: dict | None) -> list[dict]:
    """One check per test: from the JUnit XML, else from the verbose log (killed run)."""
    if step is None:
        return []
    checks: dict[str, dict] = {}
    xml = logs / "tests.xml"
    if xml.is_file():
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            root = None
        for case in [] if root is None else root.iter("testcase"):
            path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
            name = f"tests/{path.split('tests/')[-1]}::{case.get('name')}"
            record = {"name": name, "step": "tests", "verdict": "passed",
                      "seconds": float(case.get("time") or 0)}  # fmt: skip
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    record["verdict"] = "skipped" if tag == "skipped" else "failed"
                    text = (node.get("message") or "") + "\n" + (node.text or "")
                    if tag != "skipped" and "Timeout" in text:
                        record["verdict"] = "timed_out"
                    record["error"] = _short(text.strip())
                    break
            checks[name] = record
    if not checks:
        for line in _tail(logs / "tests.log", 10**7).splitlines():
            match = _RESULT.search(line)
            if match:
                verdict, node = (
                    (match.group(1), match.group(2))
                    if match.group(1)
                    else (match.group(4), match.group(3))
                )
                checks[node] = {"name": node, "step": "tests", "verdict": _VERDICT[verdict]}
                if checks[node]["verdict"] != "passed":
                    checks[node]["error"] = (
                        "see tests.log (the run ended before its JUnit report was written)"
                    )
    return list(checks.values())


def e2e_checks(out: Path, step: dict | None) -> list[dict]:
    records = _read_json(out / "e2e.json")
    if records is None:
        if step is None:
            return []
        return [{"name": "e2e/records", "step": "e2e", "verdict": "skipped" if step["verdict"] == "skipped" else "failed",
                 "error": f"no e2e.json: the e2e step {step['verdict']} ({_short(step.get('error'), 500)})"}]  # fmt: skip
    checks = []
    for r in records:
        ok = isinstance(r.get("median_ms"), (int, float)) and math.isfinite(r["median_ms"])
        not_available = str(r.get("ceiling", "")).startswith("not available")
        record = {"name": f"e2e/{r.get('case')}/{r.get('impl')}", "step": "e2e",
                  "verdict": "passed" if ok else ("skipped" if not_available else "failed"),
                  "metrics": {k: r.get(k) for k in ("median_ms", "baseline", "baseline_median_ms", "speedup",
                                                    "peak_mem_mb", "baseline_peak_mem_mb", "memory_ratio")},
                  "detail": r.get("ceiling")}  # fmt: skip
        if "capture FAILED" in str(r.get("ceiling", "")):
            record.update(
                verdict="failed",
                error="CUDA graph capture failed in the benchmark: " + r["ceiling"],
            )
        elif not ok:
            record["error"] = r.get("ceiling") or "no timing"
        checks.append(record)
    return checks


def summarize(logs: Path, out: Path, mode: str, started: float, budget: float, final: bool) -> dict:
    steps = read_steps(logs)
    by_name = {s["name"]: s for s in steps}
    env = _read_json(logs / "environment.json") or {}
    checks = [{"name": f"step/{s['name']}", "step": s["name"], "verdict": s["verdict"],
               "seconds": s["seconds"], **({"error": _short(s["error"])} if s.get("error") else {})}
              for s in steps]  # fmt: skip
    checks += [{**c, "step": "environment"} for c in env.get("checks", [])]
    smoke_list, header = smoke_checks(out, mode, by_name.get("smoke"))
    checks += build_checks(header, mode, by_name.get("smoke")) if "smoke" in by_name else []
    checks += smoke_list if "smoke" in by_name else []
    checks += test_checks(logs, by_name.get("tests"))
    checks += e2e_checks(out, by_name.get("e2e"))
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    bad = [c for c in checks if c["verdict"] in ("failed", "timed_out")]
    now = time.time()
    return {
        "schema": 1,
        "mode": mode,
        "complete": final and all(s in by_name for s in STEP_ORDER),
        "verdict": "passed" if not bad and final else ("failed" if bad else "incomplete"),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "seconds": round(now - started, 1),
        "budget_s": budget,
        "counts": counts,
        "failures": [
            {"name": c["name"], "verdict": c["verdict"], "error": _short(c.get("error"), 500)}
            for c in bad
        ],
        "environment": env.get("info", {}),
        "smoke_header": header,
        "steps": steps,
        "checks": checks,
        "files": sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else [],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    parser.add_argument("--started", type=float, required=True)
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--final", action="store_true", help="the run is over (else: incomplete)")
    args = parser.parse_args(argv)
    doc = summarize(args.logs, args.out, args.mode, args.started, args.budget, args.final)
    target = args.out / "summary.json"
    if "summary.json" not in doc["files"]:
        doc["files"] = sorted(doc["files"] + ["summary.json"])
    tmp = target.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(target)
    if args.final:
        (args.logs / "verdict").write_text(doc["verdict"] + "\n")  # run.sh's exit status
        print(f"summary: {doc['verdict']} {doc['counts']} in {doc['seconds']:.0f} s -> {target}")
        for failure in doc["failures"][:40]:
            # The end of an error is its most telling part (a traceback's last line).
            print(f"  {failure['verdict']}: {failure['name']}: {_short(failure['error'], 300)}")
        if len(doc["failures"]) > 40:
            print(f"  ... and {len(doc['failures']) - 40} more (summary.json lists all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
