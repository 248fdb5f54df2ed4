"""Corrupt or misplaced files: one line that names the file and what is wrong, never a traceback.

At fdbb492 each of these ended in a raw traceback (SafetensorError, AttributeError on a JSON list,
IsADirectoryError, RuntimeError for an unknown device, a 1.28 PB allocation for
``num_classes=10**13``) or was accepted silently (``--device cuda`` without CUDA ran on the CPU's
error path only after the data had loaded). ``cli.main`` returning 2 with one stderr line is the
contract; raising anything is a failure.
"""

import json
import math
import os
import shutil

import pytest
import torch

from sophon_fast import ProtectConfig, cli, protect
from sophon_fast.api import ProtectResult
from sophon_fast.models import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ProtectResult folder of a one-step run whose history holds a NaN loss."""
    torch.manual_seed(0)
    model = build_model("mlp", {"in_features": 16, "hidden": [8], "num_classes": 3})
    g = torch.Generator().manual_seed(1)
    data = torch.randn(24, 16, generator=g), torch.randint(0, 3, (24,), generator=g)
    config = ProtectConfig(inner_steps=1, outer_steps=1, batch_size=8, adapt_size=6)
    result = protect(model, data, data, config, progress=False)
    result.history[0]["suppression_loss"] = float("nan")
    result.history[0]["ntr_loss"] = float("inf")
    old = os.umask(0o022)
    try:
        return result.save(tmp_path_factory.mktemp("saved") / "result")
    finally:
        os.umask(old)


def _copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def _one_line_error(capsys, argv, *names):
    """Run the CLI; it must return 2 and print exactly one line naming every one of ``names``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def _truncate(d):
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "not a readable safetensors file"


def _empty(d):
    path = d / "model.safetensors"
    path.write_bytes(b"")
    return path, "not a readable safetensors file"


def _json_list(d):
    path = d / "result.json"
    path.write_text("[1, 2]")
    return path, "expected a JSON object"


def _history_int(d):
    path = d / "result.json"
    meta = json.loads(path.read_text())
    meta["history"] = 5
    path.write_text(json.dumps(meta))
    return path, "'history' should be a JSON array"


def _config_list(d):
    path = d / "result.json"
    meta = json.loads(path.read_text())
    meta["config"] = ["inner_steps"]
    path.write_text(json.dumps(meta))
    return path, "'config' should be a JSON object"


def _bad_config_value(d):
    path = d / "result.json"
    meta = json.loads(path.read_text())
    meta["config"]["inner_steps"] = -1
    path.write_text(json.dumps(meta))
    return path, "invalid config"


def _not_utf8(d):
    path = d / "result.json"
    path.write_bytes(b"\xff\xfe{}")
    return path, "not UTF-8"


def _not_json(d):
    path = d / "result.json"
    path.write_text("{'config': ")
    return path, "not valid JSON"


def _json_folder(d):
    path = d / "result.json"
    path.unlink()
    path.mkdir()
    return path, "is a folder"


def _weights_folder(d):
    path = d / "model.safetensors"
    path.unlink()
    path.mkdir()
    return path, "is a folder"


def _missing_weights(d):
    path = d / "model.safetensors"
    path.unlink()
    return path, "missing"


def _huge_spec(d):
    path = d / "result.json"
    meta = json.loads(path.read_text())
    meta["model_spec"]["kwargs"]["num_classes"] = 10**13
    path.write_text(json.dumps(meta))
    return path, "does not match model.safetensors"


def _spec_not_a_table(d):
    path = d / "result.json"
    meta = json.loads(path.read_text())
    meta["model_spec"] = "mlp"
    path.write_text(json.dumps(meta))
    return path, "'model_spec' should be"


CORRUPTIONS = [
    _truncate,
    _empty,
    _json_list,
    _history_int,
    _config_list,
    _bad_config_value,
    _not_utf8,
    _not_json,
    _json_folder,
    _weights_folder,
    _missing_weights,
    _huge_spec,
    _spec_not_a_table,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_show_names_the_corrupt_file(saved, tmp_path, capsys, corrupt):
    path, what = corrupt(_copy(saved, tmp_path))
    _one_line_error(capsys, ["show", str(path.parent)], path, what)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_load_raises_one_clear_error(saved, tmp_path, corrupt):
    path, what = corrupt(_copy(saved, tmp_path))
    with pytest.raises((ValueError, OSError)) as info:
        ProtectResult.load(path.parent)
    assert str(path) in str(info.value) and what in str(info.value)


def test_folder_that_is_a_file_and_a_missing_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(capsys, ["show", str(afile)], afile, "is a file")
    _one_line_error(capsys, ["show", str(tmp_path / "nope")], tmp_path / "nope", "no such folder")


def test_history_nan_is_written_as_null(saved):
    text = (saved / "result.json").read_text()

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    meta = json.loads(text, parse_constant=refuse)
    assert meta["history"][0]["suppression_loss"] is None
    assert meta["history"][0]["ntr_loss"] is None
    assert math.isfinite(meta["history"][0]["original_accuracy"])
    assert ProtectResult.load(saved).history[0]["suppression_loss"] is None


def test_saved_files_get_the_umask_permissions(saved):
    for name in ("result.json", "model.safetensors"):
        assert (saved / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------- protect / evaluate arguments


def _protect_toml(tmp_path, weights):
    path = tmp_path / "protect.toml"
    path.write_text(
        f'[model]\nweights = "{weights}"\n[data]\noriginal = "builtin:sklearn_digits"\n'
        'restricted = "builtin:sklearn_digits"\n[protect]\nouter_steps = 1\n'
    )
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("command", ["protect", "evaluate", "demo"])
def test_device_cuda_without_cuda(saved, tmp_path, command):
    argv = {
        "protect": [
            *("protect", "--config", str(_protect_toml(tmp_path, saved))),
            *("--out", str(tmp_path / "o")),
        ],
        "evaluate": ["evaluate", "--model", str(saved), "--out", str(tmp_path / "ev")],
        "demo": ["demo", "--quick", "--out", str(tmp_path / "demo")],
    }[command]
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
        cli.main([*argv, "--device", "cuda", "--no-progress"])
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # refused before any folder is made


@pytest.mark.parametrize("device", ["tpu9", "npu", "meta"])
def test_unknown_device(saved, tmp_path, device):
    toml = _protect_toml(tmp_path, saved)
    with pytest.raises(SystemExit, match=f"--device {device}"):
        cli.main(
            ["protect", "--config", str(toml), "--device", device, "--out", str(tmp_path / "o")]
        )


def test_out_that_is_a_file(saved, tmp_path):
    toml = _protect_toml(tmp_path, saved)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit, match=f"{afile} is a file"):
        cli.main(["protect", "--config", str(toml), "--out", str(afile), "--no-progress"])
    with pytest.raises(SystemExit, match=f"{afile} is a file"):
        cli.main(["evaluate", "--model", str(saved), "--out", str(afile), "--quick"])


def test_config_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path} is a folder"):
        cli.main(["protect", "--config", str(tmp_path)])
    toml = tmp_path / "p.toml"
    toml.write_bytes(b"\xff[model]\n")
    with pytest.raises(SystemExit, match=f"{toml} is not UTF-8"):
        cli.main(["protect", "--config", str(toml)])


def test_weights_that_are_a_file(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 16)
    _one_line_error(
        capsys,
        [
            "protect",
            "--config",
            str(_protect_toml(tmp_path, weights)),
            "--out",
            str(tmp_path / "o"),
        ],
        weights,
        "is a file",
    )


def test_grid_config_not_utf8(tmp_path):
    from sophon_fast.attacks.grid import load_grid

    path = tmp_path / "grid.toml"
    path.write_bytes(b"[grid]\nepochs = \xff\n")
    with pytest.raises(ValueError, match=f"{path}: not UTF-8"):
        load_grid(str(path))


@pytest.mark.parametrize(
    "content", [b"\xff\xfe not utf-8", b'{"fingerprint": ', b"[1, 2]", b""], ids=repr
)
def test_evaluate_reruns_a_corrupt_cell(tmp_path, content):
    from sophon_fast.attacks.evaluate import _load_done

    spec = {"id": "c0", "fingerprint": "f", "attack": {"lr": 1.0}}
    (tmp_path / "c0.json").write_bytes(content)
    assert _load_done(tmp_path, spec) is None
    (tmp_path / "c0.json").write_text(json.dumps({**spec, "loss": 1.0}))
    assert _load_done(tmp_path, spec)["loss"] == 1.0


# ---------------------------------------------------------------- data files


def _npz_variants(folder):
    import numpy as np

    good = folder / "good.npz"
    np.savez(good, x=np.random.rand(6, 1, 4, 4).astype("float32"), y=np.arange(6) % 3)
    data = good.read_bytes()
    cases = {}
    for name, write, what in [
        ("truncated", lambda p: p.write_bytes(data[: len(data) // 2]), "not a readable .npz"),
        ("empty", lambda p: p.write_bytes(b""), "not a readable .npz"),
        ("objects", None, "unreadable"),
        ("folder", lambda p: p.mkdir(), "is a folder"),
        ("npy", lambda p: np.save(open(p, "wb"), np.zeros(3)), "holds a single array"),
    ]:
        path = folder / f"{name}.npz"
        if name == "objects":
            np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
        else:
            write(path)
        cases[name] = (path, what)
    return cases


def test_corrupt_npz_data_is_one_line_naming_it(saved, tmp_path, capsys):
    for name, (path, what) in _npz_variants(tmp_path).items():
        toml = tmp_path / f"{name}.toml"
        toml.write_text(
            f'[model]\nweights = "{saved}"\n[data]\n'
            f'original = {{ format = "npz", path = "{path}" }}\n'
            'restricted = "builtin:sklearn_digits"\n'
        )
        argv = ["protect", "--config", str(toml), "--out", str(tmp_path / f"o_{name}")]
        _one_line_error(capsys, argv, path, what)


def test_data_root_that_is_a_file(tmp_path):
    from sophon_fast.data import load_spec

    afile = tmp_path / "afile"
    afile.write_text("x")
    for fmt in ("cifar", "mnist_idx", "stl10", "image_folder"):
        with pytest.raises(NotADirectoryError, match=f"{afile}: is a file; expected a folder"):
            load_spec({"format": fmt, "root": str(afile)})


def test_evaluate_reports_are_standard_json(tmp_path):
    from sophon_fast.attacks.generation import GenerationReport
    from sophon_fast.attacks.report import Report

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = {"summary": {"worst": float("nan")}, "cells": [{"loss": float("inf"), "acc": 1.5}]}
    meta = json.loads(Report(data).to_json(), parse_constant=refuse)
    assert meta["summary"]["worst"] is None and meta["cells"][0] == {"loss": None, "acc": 1.5}
    assert math.isnan(data["summary"]["worst"])  # the report in memory keeps its NaN
    report = GenerationReport(data)
    report.markdown = lambda: ""  # the table needs a full summary; only the JSON is checked
    report.write(tmp_path)
    meta = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert meta["cells"][0]["loss"] is None


@pytest.mark.parametrize("content", ["[1, 2]", '{"pair": 5}', '{"pair": {"original": 3}}'])
def test_a_mis_shaped_demo_report_beside_the_model_is_ignored(saved, content):
    (saved.parent / "report.json").write_text(content)
    try:
        assert cli._demo_pair(saved) == {}
    finally:
        (saved.parent / "report.json").unlink()


def test_grid_config_that_is_a_folder(saved, tmp_path, capsys):
    argv = ["evaluate", "--model", str(saved), "--config", str(tmp_path)]
    argv += ["--out", str(tmp_path / "o")]
    _one_line_error(capsys, argv, tmp_path, "is a folder")
