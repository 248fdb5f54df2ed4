"""A corrupt checkpoint on resume: one line naming the file, never a traceback.

Checkpoints are written atomically, so a torn one cannot come from a crash; a copied, edited or
damaged file still can. At 9364539 a truncated checkpoint.safetensors ended ``sophon-fast
protect --resume`` with a raw SafetensorError naming no file.
"""

import numpy as np
import pytest
import torch

from sophon_fast import ProtectConfig, cli
from sophon_fast.api import ProtectResult
from sophon_fast.models import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A protect TOML and the --out folder of a finished 2-step run with a checkpoint."""
    folder = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    model = build_model("mlp", {"in_features": 16, "hidden": [8], "num_classes": 3})
    ProtectResult(model=model, history=[], config=ProtectConfig()).save(folder / "pre")
    g = torch.Generator().manual_seed(1)
    for name in ("o", "r"):
        x = torch.rand(24, 1, 4, 4, generator=g).numpy()
        np.savez(folder / f"{name}.npz", x=x, y=np.arange(24) % 3)
    toml = folder / "p.toml"
    toml.write_text(
        f'[model]\nname = "mlp"\nkwargs = {{ in_features = 16, hidden = [8], num_classes = 3 }}\n'
        f'weights = "{folder / "pre"}"\n[data]\n'
        f'original = {{ format = "npz", path = "{folder / "o.npz"}" }}\n'
        f'restricted = {{ format = "npz", path = "{folder / "r.npz"}" }}\n'
        "[protect]\nouter_steps = 2\ninner_steps = 1\nbatch_size = 8\nadapt_size = 6\n"
        "guard_threshold = 0.0\ncheckpoint_every = 1\n"
    )
    assert cli.main(["protect", "--config", str(toml), "--out", str(folder / "out")]) == 0
    return toml, folder / "out"


@pytest.mark.parametrize("keep", [0, 7, 100, -64], ids=["empty", "7B", "100B", "cut-tail"])
def test_truncated_checkpoint_on_resume(run_dir, tmp_path, capsys, keep):
    import shutil

    toml, out = run_dir
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    path = copy / "checkpoints" / "checkpoint.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    argv = ["protect", "--config", str(toml), "--out", str(copy), "--resume", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    assert "not a readable safetensors checkpoint" in err
