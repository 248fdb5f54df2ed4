"""benchmarks/gpu/run.sh, the one GPU validation command: its CPU dry run end to end, and the
summary's bookkeeping when steps fail, time out or never write their results.

The dry run (``bash benchmarks/gpu/run.sh --dry-run OUT``) is the proof that the script a GPU
machine gets one try at works: the same steps, logs, time limits and summary, on the cpu and
interpreted Triton backends at tiny sizes. It takes about 2 minutes on 2 cores (limit 290 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import smoke  # noqa: E402
import summarize  # noqa: E402

STEPS = ["environment", "build", "smoke", "tests", "e2e"]
VERDICTS = {"passed", "failed", "timed_out", "skipped"}
CUDA_ONLY = {"cuda_graphs_inner", "cuda_graphs_simulation", "autocast_bf16"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    missing = [tool for tool in ("bash", "timeout", "tar") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"run.sh needs {', '.join(missing)}")
    out = tmp_path_factory.mktemp("gpu-dry-run")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # OUT would override the folder
    env["PYTHON"] = sys.executable
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(GPU / "run.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    seconds = time.monotonic() - started
    summary = json.loads((out / "summary.json").read_text())
    return proc, out, seconds, summary


def _checks(summary, prefix):
    return {c["name"]: c for c in summary["checks"] if c["name"].startswith(prefix)}


def test_exits_zero_within_five_minutes(dry_run):
    proc, _, seconds, summary = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert seconds < 300, f"the dry run took {seconds:.0f} s"
    assert summary["verdict"] == "passed" and summary["complete"] and summary["mode"] == "dry-run"


def test_writes_at_most_six_files(dry_run):
    _, out, _, summary = dry_run
    entries = sorted(p.name for p in out.iterdir())
    assert len(entries) <= 6, entries
    assert {"summary.json", "ops.json", "e2e.json", "logs.tar.gz"} <= set(entries)
    assert all((out / name).is_file() for name in entries)
    assert summary["files"] == entries


def test_every_step_ran_under_its_limit_and_is_archived(dry_run):
    _, out, _, summary = dry_run
    steps = summary["steps"]
    assert [s["name"] for s in steps] == STEPS
    for step in steps:
        assert step["verdict"] == "passed", step
        assert 0 < step["seconds"] <= step["limit_s"]
    # A step's limit includes the time earlier steps left unused, never more than is left.
    assert sum(s["seconds"] for s in steps) <= summary["budget_s"]
    assert all(s["limit_s"] <= summary["budget_s"] for s in steps)
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {f"{s}.log" for s in STEPS} | {"steps.tsv", "environment.json", "tests.xml"} <= names


def test_every_planned_check_has_a_verdict(dry_run):
    _, _, _, summary = dry_run
    checks = {c["name"]: c for c in summary["checks"]}
    expected = [spec["name"] for spec in smoke.build_plan(dry_run=True)]
    expected += [f"step/{s}" for s in STEPS] + ["env/torch", "env/triton", "env/pytest"]
    expected += ["build/backend_cpu", "build/backend_triton"]
    assert not [name for name in expected if name not in checks]
    for check in summary["checks"]:
        assert check["verdict"] in VERDICTS, check
        if check["verdict"] != "passed":
            assert check.get("error"), check  # every non-pass says why
    assert summary["counts"] == {
        v: sum(c["verdict"] == v for c in summary["checks"]) for v in summary["counts"]
    }
    assert _checks(summary, "tests/"), "no test results were recorded"
    assert _checks(summary, "e2e/small_cnn"), "no e2e record"


def test_op_comparisons_passed(dry_run):
    _, out, _, summary = dry_run
    unavailable = summary["smoke_header"]["unavailable_backends"]
    ops = _checks(summary, "ops/")
    families = {name.split("/")[1] for name in ops}
    assert families == {
        "flat_sgd_step",
        "flat_optim",
        "losses",
        "batch_norm",
        "bn_relu_pool",
        "relu_pool",
    }
    for name, check in ops.items():
        backend = name.split("/")[3]
        if check["verdict"] == "skipped":  # only a missing compiled extension (SOPHON_FAST_NO_EXT)
            assert backend in unavailable and "unavailable" in check["error"], check
        else:
            assert check["verdict"] == "passed", check
            assert check["worst"]["tol_ratio"] <= 1.0
    assert all(c["verdict"] == "passed" for n, c in ops.items() if "/triton/" in n)
    detail = json.loads((out / "ops.json").read_text())
    assert detail["header"]["triton_mode"] == "interpreted"
    engine = _checks(summary, "engine/small_cnn/")
    assert engine["engine/small_cnn/fused_vs_reference"]["verdict"] == "passed"
    for name in CUDA_ONLY:
        assert engine[f"engine/small_cnn/{name}"]["verdict"] == "skipped"
        assert "no CUDA" in engine[f"engine/small_cnn/{name}"]["error"]


# ----------------------------------------------------------------------------- bookkeeping
def test_smoke_records_a_crash_and_a_hang_and_goes_on(tmp_path):
    """A worker that dies in one check and hangs in another: both get their verdict, the checks
    after each still run (in a restarted worker). Triton only: the compiled extension is optional."""
    env = dict(
        os.environ,
        SOPHON_SMOKE_FAULT="crash:forward/triton/fp32/small;hang:backward/triton/fp32/small",
    )
    command = [sys.executable, str(GPU / "smoke.py"), "--dry-run", "--workers", "1",
               "--filter", "ops/flat_sgd_step/.*/triton/fp32", "--check-limit", "5",
               "--out", str(tmp_path / "ops.json"), "--logdir", str(tmp_path / "logs")]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "ops.json").read_text())
    verdicts = {c["name"].split("flat_sgd_step/")[1]: c for c in doc["checks"]}
    crashed, hung = verdicts["forward/triton/fp32/small"], verdicts["backward/triton/fp32/small"]
    assert crashed["verdict"] == "failed"
    assert "died during this check (exit code 9)" in crashed["error"]
    assert hung["verdict"] == "timed_out" and "5 s limit" in hung["error"]
    assert verdicts["forward/triton/fp32/large"]["verdict"] == "passed"
    assert verdicts["backward/triton/fp32/large"]["verdict"] == "passed"
    assert doc["workers_started"] == 3


def test_compare_reports_where_and_by_how_much():
    want = torch.linspace(-1.0, 1.0, 101)
    assert smoke.compare("y", want.clone(), want, 1e-6, 1e-6)["ok"]
    got = want.clone()
    got[17] += 1e-3
    result = smoke.compare("y", got, want, 1e-6, 1e-6)
    assert not result["ok"] and "flat index 17" in result["error"]
    assert result["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    got[17] = float("nan")
    assert "non-finite" in smoke.compare("y", got, want, 1.0, 1.0)["error"]
    got = want.clone()
    got[3] = torch.nextafter(want[3], torch.tensor(2.0))  # one ulp: a zero tolerance means equal
    assert not smoke.compare("y", got, want, 0.0, 0.0)["ok"]
    assert smoke.compare("y", want.clone(), want, 0.0, 0.0)["ok"]
    # atol in units of max |want|: a 2 % error on values of ~1e-3 is outside 2^-9 * max |want|
    small = want * 1e-3
    assert not smoke.compare("g", small * 1.02, small, 2**-6, 2**-9, atol_scale="max_ref")["ok"]
    assert smoke.compare("g", small * 1.02, small, 2**-6, 2**-9)["ok"]  # absolute: waved through


def test_engine_check_fails_when_graph_capture_falls_back_to_eager(monkeypatch):
    """Capture cannot work on the CPU: the engine warns and runs eagerly, which gives the same
    numbers; the check must still fail, naming the capture error."""
    import sophon_fast.engine.options as options

    monkeypatch.setattr(options, "check_device", lambda *args, **kwargs: None)
    entry = smoke.ENGINE_CHECKS["cuda_graphs_inner"]
    monkeypatch.setitem(smoke.ENGINE_CHECKS, "cuda_graphs_inner", (False, *entry[1:]))
    spec = {
        "name": "engine/small_cnn/cuda_graphs_inner",
        "group": "engine",
        "check": "cuda_graphs_inner",
    }
    result = smoke.run_engine_check(spec, torch.device("cpu"), "tiny")
    assert result["verdict"] == "failed"
    assert "capture failed, the engine ran eagerly" in result["error"]
    assert result["metrics"]["graphs_captured"] == "0/1"
    assert all(s["meta_grad_rel_l2"] == 0.0 for s in result["metrics"]["per_step"])  # eager twice


def _steps_tsv(logs, rows):
    (logs / "steps.tsv").write_text("".join("\t".join(map(str, row)) + "\n" for row in rows))


def test_summary_records_failed_timed_out_and_missing_results(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    _steps_tsv(logs, [
        ("environment", "passed", 0, 1.0, 10, "env.py", ""),
        ("build", "failed", 1, 80.0, 130, "pip install", ""),
        ("smoke", "timed_out", 124, 75.0, 75, "smoke.py", "killed at the step's 75 s limit"),
        ("tests", "skipped", "", 0, 3, "-", "the 330 s budget was used up before this step"),
    ])  # fmt: skip
    (logs / "build.log").write_text("...\nerror: nvcc fatal: Unsupported gpu architecture\n")
    doc = summarize.summarize(logs, out, "gpu", time.time() - 5, 330, final=True)
    assert doc["verdict"] == "failed" and not doc["complete"]
    checks = {c["name"]: c for c in doc["checks"]}
    assert "Unsupported gpu architecture" in checks["step/build"]["error"]
    assert checks["step/smoke"]["verdict"] == "timed_out"
    assert (
        checks["step/tests"]["verdict"] == "skipped" and "budget" in checks["step/tests"]["error"]
    )
    plan = [spec["name"] for spec in smoke.build_plan(dry_run=False)]
    for name in plan:  # no ops.json: the whole plan is listed, each with the smoke's fate
        assert checks[name]["verdict"] == "skipped" and "timed_out" in checks[name]["error"]
    assert {f["name"] for f in doc["failures"]} == {"step/build", "step/smoke"}


def test_summary_reads_partial_smoke_and_killed_pytest(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    _steps_tsv(logs, [
        ("smoke", "failed", 1, 30.0, 75, "smoke.py", ""),
        ("tests", "timed_out", 124, 60.0, 60, "pytest", "killed"),
    ])  # fmt: skip
    plan = smoke.build_plan(dry_run=False)
    recorded = [
        {**plan[0], "verdict": "failed", "error": "params: |got - want| = 1 at flat index 3"},
        {**plan[1], "verdict": "pending"},
    ]
    header = {"available_backends": {"reference": "", "triton": ""},
              "unavailable_backends": {"cuda": "the extension was built without CUDA"},
              "extension": "_C.so", "extension_with_cuda": False}  # fmt: skip
    (out / "ops.json").write_text(json.dumps({"header": header, "checks": recorded}))
    (logs / "tests.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_a.py::test_x[cuda]\n"
        "[gw1] [ 20%] FAILED tests/test_a.py::test_y[triton]\n"
        "tests/test_b.py::test_z[cuda] PASSED [ 30%]\n"
    )
    doc = summarize.summarize(logs, out, "gpu", time.time(), 330, final=True)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks[plan[0]["name"]]["verdict"] == "failed"
    assert "flat index 3" in checks[plan[0]["name"]]["error"]
    assert checks[plan[1]["name"]]["verdict"] == "skipped"  # started, never finished
    assert checks["build/backend_cuda"]["verdict"] == "failed"
    assert "without CUDA" in checks["build/backend_cuda"]["error"]
    assert checks["tests/test_a.py::test_x[cuda]"]["verdict"] == "passed"
    assert checks["tests/test_a.py::test_y[triton]"]["verdict"] == "failed"
    assert checks["tests/test_b.py::test_z[cuda]"]["verdict"] == "passed"
