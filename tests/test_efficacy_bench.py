"""benchmarks/efficacy.py's arithmetic and outputs on synthetic reports (no training, no attack).

The cells go through the real :func:`sophon_fast.attacks.report.build_report`, so the metrics are
read from the same structure ``evaluate()`` returns: best recipe per epoch budget (grid and search
cells, not trainability), AUC up to each budget, the linear-probe gaps, the mean over seeds, the
bar, the Markdown table, the CSV rows and the cache keys.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sophon_fast.attacks.report import _auc, build_report
from sophon_fast.config import ProtectConfig

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import efficacy  # noqa: E402
import table  # noqa: E402

SCOPES = {"full": "full", "lp": "linear_probe", "search": "lora", "benign": "reinit_head_full"}


def _cell(arm: str, kind: str, recipe: str, curve: list[float], seed: int = 0) -> dict:
    attack = {"scope": SCOPES[recipe], "optimizer": "adam", "lr": 1e-3, "epochs": len(curve) - 1}
    return {
        "id": f"{arm}-{kind}-{recipe}-s{seed}",
        "arm": arm,
        "kind": kind,
        "attack": attack,
        "label": recipe,
        "seed": seed,
        "curve": list(curve),
    }


def _report(shift: float = 0.0, seed: int = 0) -> dict:
    """A three-arm report: protected, normal and scratch, one seed, 4 epochs."""
    curves = {
        "protected": {
            ("grid", "full"): [10, 20, 30, 40, 50],
            ("grid", "lp"): [10, 15, 20, 25, 30],
            ("search", "search"): [10, 30, 25, 20, 60],
            ("trainability", "benign"): [99, 99, 99, 99, 99],  # another domain: never counted
        },
        "normal": {
            ("grid", "full"): [50, 80, 90, 95, 97],
            ("grid", "lp"): [50, 60, 70, 80, 90],
            ("search", "search"): [50, 70, 80, 90, 95],
        },
        "scratch": {
            ("grid", "full"): [10, 25, 35, 45, 55],
            ("grid", "lp"): [10, 12, 14, 16, 20],
            ("search", "search"): [10, 10, 10, 10, 10],
        },
    }
    cells = [
        _cell(arm, kind, recipe, [v + shift for v in curve], seed)
        for arm, mine in curves.items()
        for (kind, recipe), curve in mine.items()
    ]
    baseline = {
        key: {"restricted_accuracy": 10.0, "original_accuracy": None}
        for key in ("protected", "normal", f"scratch@{seed}")
    }
    arms = ["protected", "normal", "scratch"]
    report = build_report(cells, arms=arms, seeds=[seed], baseline=baseline, config={}, target=0.9)
    return report.data


def test_auc_is_the_reports():
    for curve in ([5.0], [1.0, 2.0], [10, 30, 25, 20, 60], [3.5, 0.0, 7.25]):
        assert efficacy.auc(curve) == pytest.approx(_auc(curve))


def test_best_auc_and_linear_probe_gaps():
    m = efficacy.case_metrics(_report(), {"normal": 97.0, "protected": 95.5})
    assert m["original_drop"] == pytest.approx(1.5)
    assert list(m["best_gap"]) == ["1", "2", "3", "final"]
    # protected best per epoch (grid + search): 30, 30, 40, 60; scratch: 25, 35, 45, 55
    assert m["best"]["protected"] == {"1": 30, "2": 30, "3": 40, "final": 60}
    assert m["best"]["scratch"] == {"1": 25, "2": 35, "3": 45, "final": 55}
    assert m["best_gap"] == pytest.approx({"1": 5, "2": -5, "3": -5, "final": 5})
    # AUC up to e1: protected max(15, 12.5, 20) = 20, scratch max(17.5, 11, 10) = 17.5
    assert m["auc_gap"]["1"] == pytest.approx(2.5)
    # final: protected max(30, 20, 27.5) = 30, scratch full (17.5 + 30 + 40 + 50) / 4 = 34.375
    assert m["auc_gap"]["final"] == pytest.approx(30 - 34.375)
    # final AUC equals the report's own per-cell auc
    protected_cells = efficacy.attack_cells(_report(), "protected")
    assert m["auc"]["protected"]["final"] == max(c["auc"] for c in protected_cells)
    assert m["linear_probe"] == {"protected": 30, "normal": 90, "scratch": 20}
    assert m["linear_probe_gap_scratch"] == pytest.approx(10)
    assert m["linear_probe_gap_normal"] == pytest.approx(-60)


def test_budgets_follow_the_grids_epochs():
    assert efficacy.budget_names(6) == ["1", "2", "3", "final"]
    assert efficacy.budget_names(2) == ["1", "2", "final"]


def test_mean_over_seeds_and_the_bar():
    first = efficacy.case_metrics(_report(0.0, 0), {"normal": 97.0, "protected": 96.0})
    second = efficacy.case_metrics(_report(2.0, 1), {"normal": 97.0, "protected": 94.0})
    mean = efficacy.mean_tree([first, second])
    assert mean["original_drop"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert mean["best_gap"] == pytest.approx(first["best_gap"])  # the shift cancels
    assert mean["best"]["scratch"]["final"] == pytest.approx(56)
    assert efficacy.mean_tree([{"a": None, "b": "x"}, {"a": 1.0, "b": "y"}]) == {
        "a": None,
        "b": None,
    }
    v = efficacy.verdict(mean)  # gaps +5 at e1 and final: fails
    assert not v["passed"] and v["original_drop"] and not v["1"] and v["2"]
    edge = {"original_drop": 2.0, "best_gap": {"1": 1.0, "final": -3.0}}
    assert efficacy.verdict(edge)["passed"]  # the bar is inclusive
    assert not efficacy.verdict({**edge, "original_drop": 2.01})["passed"]
    assert not efficacy.verdict({**edge, "best_gap": {"1": 1.01, "final": 0.0}})["passed"]


def _result(tmp_path: Path) -> dict:
    per_seed = {}
    for seed, shift in ((0, 0.0), (1, 2.0)):
        m = efficacy.case_metrics(_report(shift, seed), {"normal": 97.0, "protected": 95.5})
        m["seconds"] = {"pretrain": 10.0, "protect": 100.0 + 2 * seed, "evaluate": 200.0}
        m["cached"] = {"pretrain": True, "protect": False, "evaluate": False}
        m["evaluation"] = {"cells": 48, "cells_reused": 32 * seed, "cell_seconds": 400.0}
        per_seed[str(seed)] = m
    config = ProtectConfig(outer_steps=40)
    return {
        "format": efficacy.FORMAT,
        "config_name": "official",
        "config": config.to_dict(),
        "quick": True,
        "seeds": [0, 1],
        "evaluation": {"attacks": "quick", "workers": 2, "benign": True, "epochs": 4},
        "bar": efficacy.BAR,
        "environment": {
            "device": "cpu (2 cores)",
            "torch": "2.13.0",
            "triton": "3.8.0",
            "git_sha": "abc1234",
            "date": "2026-12-06T20:00:00Z",
            "threads": 2,
        },
        "cases": {"digits_full": efficacy.summarise(efficacy.CASES["digits_full"], per_seed)},
    }


def test_table_and_write_into(tmp_path):
    result = _result(tmp_path)
    block = table.render_efficacy(json.loads(json.dumps(result)))  # as read back from the file
    row = next(line for line in block.splitlines() if line.startswith("| digits_full"))
    assert row == (
        "| digits_full | 97.0 → 95.5 (1.5) | +5.0 | -5.0 | -5.0 | +5.0 "
        "| +2.5 / +0.0 / -4.2 / -4.4 | +10.0 / -60.0 | 10* / 101 / 200† | fail |"
    )
    assert "40 outer steps, quick" in block and "4 epochs, 2 workers" in block
    assert "* from the cache" in block and "† some cells reused" in block
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- efficacy-table:start -->\nold\n<!-- efficacy-table:end -->\nb\n")
    table.write_into(readme, block, table.EFFICACY_START, table.EFFICACY_END)
    text = readme.read_text()
    assert "old" not in text and row in text and text.endswith("<!-- efficacy-table:end -->\nb\n")
    path = tmp_path / "efficacy.json"
    path.write_text(json.dumps(result))
    out = tmp_path / "out.md"
    out.write_text(readme.read_text())
    assert table.main(["--efficacy", str(path), "--write", str(out)]) == 0
    assert out.read_text() == text


def test_csv_rows(tmp_path):
    result = _result(tmp_path)
    rows = efficacy.csv_rows(result)
    assert [r["seed"] for r in rows] == ["0", "1", "mean"]
    assert rows[-1]["passed"] is False and rows[0]["passed"] == ""
    assert rows[0]["best_gap_e1"] == pytest.approx(5) and rows[0]["auc_gap_final"] is not None
    assert [r["evaluate_cells_reused"] for r in rows] == [0, 32, 16]
    assert rows[0]["epochs"] == 4 and rows[0]["pretrain_cached"] is True
    path = tmp_path / "efficacy.csv"
    efficacy.append_csv(rows, path)
    efficacy.append_csv(rows, path)
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 6 and list(read[0]) == efficacy.CSV_FIELDS
    assert read[2]["config"] == "official" and read[2]["git_sha"] == "abc1234"


def test_cache_keys():
    full, shot = efficacy.CASES["digits_full"], efficacy.CASES["digits_10shot"]
    config = ProtectConfig(outer_steps=40)
    key = efficacy.protect_key(full, config, 0, "p")
    assert efficacy.protect_key(shot, config, 0, "p") == key  # one protected model for both
    assert efficacy.protect_key(full, ProtectConfig(outer_steps=40), 0, "p") == key
    assert efficacy.protect_key(full, dataclasses.replace(config, outer_steps=41), 0, "p") != key
    assert efficacy.protect_key(full, dataclasses.replace(config, loss="klu"), 0, "p") != key
    assert efficacy.protect_key(full, config, 1, "p") != key
    assert efficacy.protect_key(full, config, 0, "q") != key
    assert efficacy.protect_key(efficacy.CASES["digits_to_mnist"], config, 0, "p") != key
    pre = efficacy.pretrain_key("mnist5k", 10, 0, "cpu")
    assert pre == efficacy.pretrain_key("mnist5k", 10, 0, "cpu")
    assert pre != efficacy.pretrain_key("mnist5k", 10, 1, "cpu")
    assert pre != efficacy.pretrain_key("sklearn_digits", 10, 0, "cpu")


def test_config_from_preset_and_files(tmp_path):
    assert efficacy.resolve_config("official") == ("official", ProtectConfig())
    (tmp_path / "mine.json").write_text(json.dumps({"loss": "klu", "outer_steps": 7}))
    name, config = efficacy.resolve_config(str(tmp_path / "mine.json"))
    assert name == "mine" and config == ProtectConfig(loss="klu", outer_steps=7)
    (tmp_path / "t.toml").write_text('[protect]\ninner_steps = 3\n\n[output]\ndir = "x"\n')
    assert efficacy.resolve_config(str(tmp_path / "t.toml")) == ("t", ProtectConfig(inner_steps=3))
    (tmp_path / "bad.json").write_text(json.dumps({"outer_stepz": 7}))
    with pytest.raises(SystemExit, match="outer_stepz"):
        efficacy.resolve_config(str(tmp_path / "bad.json"))
    with pytest.raises(SystemExit, match="does not exist"):
        efficacy.resolve_config(str(tmp_path / "missing.toml"))


def test_ten_shot_subset():
    case = efficacy.CASES["digits_10shot"]
    first, again = efficacy.attacker_train(case, 0), efficacy.attacker_train(case, 0)
    assert len(first) == 100 and first.labels.bincount().tolist() == [10] * 10
    assert first.images.equal(again.images)
    assert not first.images.equal(efficacy.attacker_train(case, 1).images)
    assert len(efficacy.attacker_train(efficacy.CASES["digits_full"], 0)) > 1000
