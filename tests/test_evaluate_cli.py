"""`sophon-fast evaluate` on checkpoint folders as protect() and the demo write them."""

from __future__ import annotations

import json

import torch

from sophon_fast.api import ProtectConfig, ProtectResult
from sophon_fast.cli import main
from sophon_fast.models import SmallCNN


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, image_size=28, widths=(2, 3))
    return ProtectResult(model=model, history=[], config=ProtectConfig()).save(path)


def test_cli_evaluate_writes_and_resumes_a_report(tmp_path, capsys):
    protected, normal = _checkpoint(tmp_path / "protected", 0), _checkpoint(tmp_path / "pre", 1)
    grid = tmp_path / "grid.toml"
    grid.write_text(
        '[grid]\nepochs = 1\nseeds = [0]\nbenign = "none"\n'
        '[[grid.sweep]]\nscope = "head_only"\noptimizer = "adam"\nlr = 1e-2\nbatch_size = 512\n'
        "[grid.search]\ntrials = 0\n"
    )
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(protected), "--normal", str(normal), "--config", str(grid)]
    argv += ["--out", str(out), "--workers", "1", "--original", "none", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for arm in ("protected", "normal", "scratch"):
        assert report["arms"][arm]["worst_case"]["restricted_accuracy"] >= 0
        assert report["arms"][arm]["cells"][0]["attack"]["scope"] == "head_only"
    assert "protected_minus_scratch_worst" in report["summary"]
    assert "| protected |" in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(stamps) == 3
    assert main(argv) == 0  # every cell is reused, none rewritten
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_cli_evaluate_rejects_config_and_quick_together(tmp_path):
    protected = _checkpoint(tmp_path / "protected", 0)
    try:
        main(["evaluate", "--model", str(protected), "--quick", "--config", "x.toml", "--out", "o"])
    except SystemExit as error:
        assert "not both" in str(error)
    else:
        raise AssertionError("--config with --quick must fail")
