"""Data fingerprints: resuming protect() (both modes) or evaluate() on changed data is refused
with an error naming the data set.

At fdbb492 protect() checkpoints stored no data fingerprint at all, and evaluate() compared
shape + sum of the images + labels: a horizontally flipped restricted set has the same sum, so a
rerun reused all 36 cached cells (worst 75.4 % where a fresh run gave 66.0 %). Now both store a
SHA-256 of the bytes of every data set.
"""

from __future__ import annotations

import pytest
import torch

from sophon_fast.api import ProtectConfig, protect
from sophon_fast.attacks import evaluate
from sophon_fast.engine.checkpoint import data_fingerprint
from sophon_fast.models import SmallCNN, build_model


def _data(n, classes=3, side=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)


def _flipped(pair):
    return pair[0].flip(-1), pair[1]


def test_the_fingerprint_sees_what_shape_sum_and_labels_missed():
    x, y = _data(10)
    assert data_fingerprint(x, y) == data_fingerprint(x.clone(), y.clone())
    flipped = x.flip(-1)
    assert torch.equal(flipped.sum(), x.sum()) or abs(float(flipped.sum() - x.sum())) < 1e-3
    assert data_fingerprint(flipped, y) != data_fingerprint(x, y)
    assert data_fingerprint(x[[1, 0, *range(2, 10)]], y) != data_fingerprint(x, y)  # order
    assert data_fingerprint(x.double(), y) != data_fingerprint(x, y)  # dtype
    assert data_fingerprint(x, None) != data_fingerprint(x, y)


def test_protect_resume_refuses_changed_data(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, in_channels=1, image_size=6, widths=(3, 4))
    original, restricted = _data(40, seed=1), _data(30, seed=2)
    config = ProtectConfig(dtype="float64", inner_steps=2, batch_size=8, adapt_size=5,
                           outer_steps=2, guard_threshold=None)  # fmt: skip
    protect(model, original, restricted, config, checkpoint_dir=tmp_path, progress=False)
    longer = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 3})
    with pytest.raises(ValueError, match="the restricted data differs.*overwrite=True"):
        protect(model, original, _flipped(restricted), longer, checkpoint_dir=tmp_path,
                resume=True, progress=False)  # fmt: skip
    labels = original[1].clone()
    labels[0] = (labels[0] + 1) % 3
    with pytest.raises(ValueError, match="the original data differs"):
        protect(model, (original[0], labels), restricted, longer, checkpoint_dir=tmp_path,
                resume=True, progress=False)  # fmt: skip
    resumed = protect(model, original, restricted, longer, checkpoint_dir=tmp_path, resume=True,
                      progress=False)  # fmt: skip
    assert len(resumed.history) == 3


def test_generation_resume_refuses_changed_images(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", {"in_channels": 1, "image_size": 8, "base_channels": 8,
                                       "channel_mults": [1, 2], "groups": 4})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    original = torch.rand(14, 1, 8, 8, generator=g) * 2 - 1
    restricted = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    config = ProtectConfig(mode="generation", loss="dos", inner_steps=2, batch_size=6,
                           adapt_size=4, outer_steps=1, eval_size=4)  # fmt: skip
    protect(model, original, restricted, config, checkpoint_dir=tmp_path, progress=False)
    longer = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    with pytest.raises(ValueError, match="the restricted data differs"):
        protect(model, original, restricted.flip(-1), longer, checkpoint_dir=tmp_path,
                resume=True, progress=False)  # fmt: skip


def test_evaluate_resume_refuses_a_flipped_restricted_set(tmp_path):
    grid = {"sweep": [{"scope": "full", "optimizer": "adam", "lr": 1e-2}], "seeds": [0],
            "search": {"trials": 0}, "benign": None}  # fmt: skip
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, image_size=6, widths=(4, 5))
    train, test = _data(20), _data(7, seed=1)
    evaluate(model, (train, test), attacks=grid, epochs=1, report_dir=tmp_path, scratch=False)
    with pytest.raises(ValueError, match="different restricted_train data.*delete"):
        evaluate(model, (_flipped(train), test), attacks=grid, epochs=1, report_dir=tmp_path,
                 scratch=False)  # fmt: skip
    with pytest.raises(ValueError, match="different restricted_test data"):
        evaluate(model, (train, _flipped(test)), attacks=grid, epochs=1, report_dir=tmp_path,
                 scratch=False)  # fmt: skip
    # the same data resumes from the cells (and another report_dir starts fresh)
    again = evaluate(
        model, (train, test), attacks=grid, epochs=1, report_dir=tmp_path, scratch=False
    )
    fresh = evaluate(model, (_flipped(train), test), attacks=grid, epochs=1,
                     report_dir=tmp_path / "other", scratch=False)  # fmt: skip
    assert again.data["arms"]["protected"]["cells"][0]["curve"]
    recorded = again.data["config"]["data"]["fingerprints"]
    assert (
        recorded["restricted_train"] == data_fingerprint(*train) and recorded["original"] == "none"
    )
    assert fresh.data["arms"]["protected"]["cells"][0]["curve"]
