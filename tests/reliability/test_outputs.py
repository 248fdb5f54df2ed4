"""Output and overwrite safety: ``--out`` and ``checkpoint_dir`` are created and checked writable
before the first step, and an existing checkpoint or result is never replaced without
``--resume`` / ``resume=True`` or ``--overwrite`` / ``overwrite=True``.

At fdbb492 an unwritable ``--out`` failed in ``result.save`` after every step had run (the run was
lost), and a second ``sophon-fast protect`` into the same folder silently replaced the first
run's checkpoint and result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sophon_fast import cli
from sophon_fast.api import ProtectConfig, ProtectResult, protect
from sophon_fast.engine.checkpoint import load_checkpoint
from sophon_fast.models import build_model

MLP = {"in_features": 16, "hidden": [8], "num_classes": 3}


def tiny():
    torch.manual_seed(0)
    model = build_model("mlp", MLP)
    g = torch.Generator().manual_seed(0)
    original = (torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    restricted = (
        torch.rand(30, 1, 4, 4, generator=g) * 0.5 + 0.5,
        torch.randint(0, 3, (30,), generator=g),
    )
    return model, original, restricted


def config(**overrides):
    base = dict(inner_steps=2, batch_size=8, adapt_size=5, outer_steps=2, guard_threshold=None)
    base.update(overrides)
    return ProtectConfig(**base)


def test_an_unwritable_checkpoint_dir_fails_before_the_first_step(tmp_path):
    model, original, restricted = tiny()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    steps = []
    with pytest.raises(PermissionError, match="cannot be created or written"):
        protect(model, original, restricted, config(), checkpoint_dir=blocker / "checkpoints",
                callbacks=[steps.append], progress=False)  # fmt: skip
    assert steps == []


def test_an_existing_checkpoint_needs_resume_or_overwrite(tmp_path):
    model, original, restricted = tiny()
    protect(model, original, restricted, config(seed=1), checkpoint_dir=tmp_path, progress=False)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    steps = []
    with pytest.raises(
        FileExistsError, match="already holds a checkpoint \\(step 2\\).*resume.*overwrite"
    ):
        protect(model, original, restricted, config(), checkpoint_dir=tmp_path,
                callbacks=[steps.append], progress=False)  # fmt: skip
    assert steps == [] and (tmp_path / "checkpoint.safetensors").read_bytes() == before
    fresh = protect(model, original, restricted, config(outer_steps=1), checkpoint_dir=tmp_path,
                    overwrite=True, progress=False)  # fmt: skip
    _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and meta["config"]["seed"] == fresh.config.seed == 99


@pytest.fixture
def cli_config(tmp_path):
    model, original, restricted = tiny()
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, (x, y) in (("original", original), ("restricted", restricted)):
        np.savez(folder / f"{name}.npz", x=x.numpy(), y=y.numpy())
    ProtectResult(model=model, history=[], config=ProtectConfig()).save(folder / "pretrained")
    path = folder / "protect.toml"
    path.write_text(
        f"""
[model]
name = "mlp"
kwargs = {{ in_features = 16, hidden = [8], num_classes = 3 }}
weights = "{folder / "pretrained"}"
[data]
original = {{ format = "npz", path = "{folder / "original.npz"}", num_classes = 3 }}
restricted = {{ format = "npz", path = "{folder / "restricted.npz"}", num_classes = 3 }}
[protect]
outer_steps = 1
inner_steps = 2
batch_size = 8
adapt_size = 5
guard_threshold = 0.0
"""
    )
    return path


def test_cli_unwritable_out_fails_before_any_step(cli_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to the output folder"):
        cli.main(
            ["protect", "--config", str(cli_config), "--out", str(blocker / "out"), "--no-progress"]
        )


def test_cli_refuses_to_replace_a_result_without_resume_or_overwrite(cli_config, tmp_path):
    out = tmp_path / "out"
    argv = ["protect", "--config", str(cli_config), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    stamp = (out / "checkpoints" / "checkpoint.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="already holds .*--resume.*--overwrite"):
        cli.main(argv)
    assert (out / "checkpoints" / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    assert cli.main(argv + ["--resume"]) == 0  # nothing left to run: the same result again
    assert cli.main(argv + ["--overwrite"]) == 0
    assert (out / "checkpoints" / "checkpoint.safetensors").stat().st_mtime_ns != stamp
