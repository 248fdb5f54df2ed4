"""Strict configs: typos and values that used to run (or fail late) are clear errors up front.

Each case here ran at fdbb492 as something else: a misspelt ``[protekt]`` table started the
official 1000 x 50-step default run, ``config.inner_steps = 0`` set after construction ran as an
unprotected "success", a float label 2.7 was truncated to 2, and seed 2**70, base_lr 1e200, a
meta-device model, a forward with fewer logits than the head or dict dataset items failed deep
inside the run with a message that named neither the field nor the input.
"""

import dataclasses

import pytest
import torch

from sophon_fast import ProtectConfig, cli, protect, simulate
from sophon_fast.models import build_model

TINY = dict(inner_steps=1, outer_steps=1, batch_size=8, adapt_size=6, guard_threshold=None)


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", {"in_features": 16, "hidden": [8], "num_classes": 3})


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def _protect(model=None, original=None, config=None):
    data = _data()
    return protect(
        _mlp() if model is None else model,
        data if original is None else original,
        data,
        ProtectConfig(**TINY) if config is None else config,
        progress=False,
    )


# ---------------------------------------------------------------- TOML


def _toml(tmp_path, body):
    path = tmp_path / "protect.toml"
    base = (
        '[model]\nname = "mlp"\nweights = "w"\n'
        '[data]\noriginal = "builtin:sklearn_digits"\nrestricted = "builtin:sklearn_digits"\n'
    )
    path.write_text(base + body)
    return path


@pytest.mark.parametrize(
    "body, named",
    [
        ("[protekt]\nouter_steps = 1\n", "protekt"),
        ("[protect]\nouter_step = 1\n", "outer_step"),
        ("[output]\ndri = 'x'\n", "dri"),
        ("extra = 1\n", "extra"),  # lands in [data]
        ("[data.more]\n", "more"),
    ],
)
def test_unknown_tables_and_keys_are_named(tmp_path, body, named):
    path = _toml(tmp_path, body)
    with pytest.raises(SystemExit, match=named) as info:
        cli.main(["protect", "--config", str(path), "--no-progress"])
    assert str(path) in str(info.value)


def test_unknown_model_key_is_named(tmp_path):
    path = tmp_path / "protect.toml"
    path.write_text(
        '[model]\nweights = "w"\nwieghts = "v"\n[data]\noriginal = "a"\nrestricted = "b"\n'
    )
    with pytest.raises(SystemExit, match=r"wieghts.*\[model\]"):
        cli.main(["protect", "--config", str(path), "--no-progress"])


def test_bad_protect_value_names_the_file(tmp_path):
    path = _toml(tmp_path, "[protect]\ninner_steps = 0\n")
    with pytest.raises(SystemExit, match=r"protect\.toml \[protect\]: ProtectConfig\.inner_steps"):
        cli.main(["protect", "--config", str(path), "--no-progress"])


# ---------------------------------------------------------------- ProtectConfig at run time


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("inner_steps", 0, "inner_steps"),
        ("batch_size", "8", "batch_size"),
        ("loss", "ce", "loss"),
        ("adapt_size", 8, "adapt_size"),
    ],
)
def test_fields_set_after_construction_are_validated_when_protect_starts(field, value, message):
    config = ProtectConfig(**TINY)
    setattr(config, field, value)
    with pytest.raises((ValueError, TypeError), match=message):
        _protect(config=config)


def test_simulate_validates_the_config_again():
    model = _mlp()
    x, y = _data(8)
    config = ProtectConfig(**TINY)
    config.order = 3
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="order"):
        simulate(model, [(x, y)], [mask], [mask], config)


def test_revalidation_leaves_the_callers_config_alone():
    config = ProtectConfig(**TINY)
    result = _protect(config=config)
    assert dataclasses.asdict(result.config) == dataclasses.asdict(config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": 2**70}, "seed"),
        ({"base_lr": 1e200}, r"alpha \* base_lr"),
        ({"beta": 1e30, "base_lr": 1e10}, r"beta \* base_lr"),
        ({"inner_lr": 1e40}, "inner_lr"),
        ({"adversaries": [("adam", 1e200)]}, "adversaries"),
    ],
)
def test_values_that_overflowed_inside_the_run_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProtectConfig(**{**TINY, **kwargs})


def test_largest_seed_still_runs():
    result = _protect(config=ProtectConfig(**{**TINY, "seed": 2**62}))
    assert len(result.history) == 1


# ---------------------------------------------------------------- model and data


def test_meta_device_model_is_refused_before_the_run():
    with torch.device("meta"):
        model = build_model("mlp", {"in_features": 16, "hidden": [8], "num_classes": 3})
    with pytest.raises(ValueError, match="meta device"):
        _protect(model=model)


class _FewerLogits(torch.nn.Module):
    """Its head has 3 outputs but its forward returns 2 (a slicing bug)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))[:, :2]


def test_forward_with_fewer_logits_than_the_head_is_refused():
    with pytest.raises(ValueError, match=r"returns \(2, 2\).*expected logits \(2, 3\)"):
        _protect(model=_FewerLogits())


class _Items(torch.utils.data.Dataset):
    def __init__(self, make):
        self.x, self.y = _data()
        self.make = make

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.make(self.x[i], self.y[i])


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, y: (x, float(y) + 0.7), ValueError, r"item 0 has the label 2\.7"),
        (lambda x, y: (x, y.float()), ValueError, "torch.float32 label"),
        (lambda x, y: {"x": x, "y": y}, TypeError, "item 0 is a dict"),
        (lambda x, y: (x, y, 0), TypeError, "item 0 is a tuple of length 3"),
    ],
)
def test_map_style_dataset_items_are_checked(make, error, message):
    with pytest.raises(error, match=message):
        _protect(original=_Items(make))


def test_map_style_dataset_with_integer_labels_still_runs():
    import numpy as np

    result = _protect(original=_Items(lambda x, y: (x, np.int64(y))))
    assert len(result.history) == 1
