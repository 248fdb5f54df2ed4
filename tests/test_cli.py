"""The command line and the demo pipeline, on the quick setting (a pipeline check, not a result)."""

import json

import pytest
import torch

from sophon_fast import cli
from sophon_fast.api import ProtectResult
from sophon_fast.config import ProtectConfig

REPORT_KEYS = {
    "original_accuracy",
    "restricted_accuracy_final",
    "restricted_accuracy_curve",
    "config",
    "seconds",
}
ARMS = {"normal", "protected", "scratch"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_a_complete_report(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["original_accuracy"]) == {"unprotected", "protected"}
    assert set(report["restricted_accuracy_final"]) == ARMS
    for arm in ARMS:
        curve = report["restricted_accuracy_curve"][arm]
        assert len(curve) == report["demo_attack"]["epochs"] + 1
        assert all(0.0 <= acc <= 100.0 for acc in curve)
        assert curve[-1] == report["restricted_accuracy_final"][arm]
    assert report["quick"] is True
    assert (demo_dir / "restricted_accuracy.png").stat().st_size > 10_000


def test_demo_checkpoints_reload(demo_dir):
    pretrained = ProtectResult.load(demo_dir / "pretrained")
    protected = ProtectResult.load(demo_dir / "protected")
    assert pretrained.history == [] and len(protected.history) == 3
    x = torch.rand(4, 1, 28, 28)
    pretrained.model.eval()
    protected.model.eval()
    assert not torch.equal(pretrained.model(x), protected.model(x))


def test_show_prints_a_summary(demo_dir, capsys):
    assert cli.main(["show", str(demo_dir / "protected"), "--data", "builtin:mnist5k"]) == 0
    out = capsys.readouterr().out
    assert "SmallCNN" in out and "outer steps run: 3" in out and "accuracy on mnist5k/test" in out


def test_protect_from_a_toml_config(demo_dir, tmp_path, capsys):
    config = tmp_path / "protect.toml"
    config.write_text(
        f"""
[model]
weights = "{demo_dir / "pretrained"}"
[data]
original = "builtin:mnist5k"
restricted = "builtin:sklearn_digits"
[protect]
outer_steps = 2
inner_steps = 2
eval_every = 2
"""
    )
    out = tmp_path / "protected"
    assert cli.main(["protect", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    result = ProtectResult.load(out)
    assert len(result.history) == 2 and result.config.inner_steps == 2
    assert "protected model written to" in capsys.readouterr().out


def test_protect_from_a_toml_preset(demo_dir, tmp_path):
    config = tmp_path / "protect.toml"
    config.write_text(
        f"""
[model]
weights = "{demo_dir / "pretrained"}"
[data]
original = "builtin:mnist5k"
restricted = "builtin:sklearn_digits"
[protect]
preset = "robust"
outer_steps = 1
inner_steps = 2
eval_every = 1
guard_threshold = 0.0
"""
    )
    out = tmp_path / "protected"
    assert cli.main(["protect", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    result = ProtectResult.load(out)
    expected = ProtectConfig.preset(
        "robust", outer_steps=1, inner_steps=2, eval_every=1, guard_threshold=0.0
    )
    assert result.config == expected
    assert result.history[0]["draws"][0]["adversary"]["name"] in (
        "sgd",
        "momentum",
        "adam",
        "adagrad",
        "adadelta",
    )
    config.write_text(config.read_text().replace('"robust"', '"strongest"'))
    with pytest.raises(SystemExit, match="unknown preset 'strongest'"):
        cli.main(["protect", "--config", str(config), "--out", str(tmp_path / "other")])


def test_protect_config_errors_are_clear(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[model]\nname = "small_cnn"\n[data]\noriginal = "builtin:mnist5k"\n')
    with pytest.raises(SystemExit, match="needs 'restricted'"):
        cli.main(["protect", "--config", str(config)])
    config.write_text('[model]\nname = "small_cnn"\n[data]\noriginal = "a"\nrestricted = "b"\n')
    with pytest.raises(SystemExit, match="needs 'weights'"):
        cli.main(["protect", "--config", str(config)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["protect", "--config", str(tmp_path / "missing.toml")])


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out
