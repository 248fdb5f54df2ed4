"""Attack suite: scopes touch exactly their parameters, LoRA merges back, seeds reproduce, evaluate()
resumes to the same report, bad configs fail clearly. Tiny CNNs on 6x6 images keep it fast."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sophon_fast.attacks import (
    SCOPES,
    Attack,
    add_lora,
    apply_scope,
    evaluate,
    load_grid,
    merge_lora,
    run_attack,
)
from sophon_fast.attacks.grid import DEFAULT_GRID, QUICK_GRID, GridConfig
from sophon_fast.models import MLP, SmallCNN, VGGSmall


def _data(n: int, classes: int = 3, side: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, image_size=6, widths=(4, 5))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# which state entries each scope may change on the SmallCNN (features.0 conv, .1 BN, .4 conv, .5 BN, fc)
EXPECTED = {
    "full": None,  # everything
    "reinit_head_full": None,
    "linear_probe": {"fc.weight", "fc.bias"},
    "head_only": {"fc.weight", "fc.bias"},
    "last_k": {"fc.weight", "fc.bias", "features.4.weight", "features.5.weight", "features.5.bias",
               "features.5.running_mean", "features.5.running_var", "features.5.num_batches_tracked"},
    "bn_only": {f"features.{i}.{n}" for i in (1, 5)
                for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
    "lora": {"fc.weight", "features.0.weight", "features.4.weight"},  # merged updates only
}  # fmt: skip


@pytest.mark.parametrize("scope", SCOPES)
def test_scope_touches_exactly_its_parameters(scope):
    model = _cnn()
    before = _state(model)
    attack = Attack(scope=scope, optimizer="adam", lr=1e-2, epochs=2, batch_size=16, last_k=2)
    result = run_attack(model, _data(40), _data(13, seed=1), attack, seed=3, keep_model=True)
    after = result["model"].state_dict()
    assert set(after) == set(before), "the attacked model must keep its architecture"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = EXPECTED[scope] if EXPECTED[scope] is not None else set(before)
    assert changed <= allowed, f"{scope} changed {sorted(changed - allowed)}"
    trainable = {k for k in allowed if "running" not in k and "num_batches" not in k}
    assert trainable & changed == trainable, f"{scope} left {sorted(trainable - changed)} untouched"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "input modified"


def test_lora_merges_back_to_the_same_function():
    model = _cnn()
    model.eval()
    x = _data(9)[0]
    reference = model(x)
    params = add_lora(model, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), reference)  # B = 0: the adapters start as the identity
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    adapted = model(x)
    assert not torch.allclose(adapted, reference)
    merge_lora(model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert set(model.state_dict()) == set(_cnn().state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_linear_only_model_and_rank_check():
    torch.manual_seed(0)
    model = MLP(in_features=36, hidden=(7,), num_classes=3)
    x = torch.rand(5, 36)
    params = add_lora(model, rank=2)
    with torch.no_grad():
        for p in params:
            p.uniform_(-0.5, 0.5)
    adapted = model(x)
    torch.testing.assert_close(merge_lora(model)(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(MLP(in_features=4, hidden=(), num_classes=2), rank=0)


@pytest.mark.parametrize(
    "attack",
    [
        Attack(scope="full", optimizer="nesterov", schedule="warmup_cosine", data_fraction=0.5),
        Attack(scope="reinit_head_full", optimizer="rmsprop", lr=1e-3, probe="noise"),
        Attack(scope="lora", optimizer="adagrad", schedule="cosine", probe="reinit_last_k"),
    ],
    ids=lambda a: a.label,
)
def test_seeds_reproduce(attack):
    attack = Attack.from_dict({**attack.to_dict(), "epochs": 2, "batch_size": 8})
    train, test = _data(30), _data(11, seed=1)
    first = run_attack(_cnn(), train, test, attack, seed=5, original_test=_data(7, seed=2))
    again = run_attack(_cnn(), train, test, attack, seed=5, original_test=_data(7, seed=2))
    assert first["curve"] == again["curve"]
    assert first["original_accuracy_after"] == again["original_accuracy_after"]


def test_schedules_and_optimizers():
    warm = Attack(schedule="warmup_cosine", warmup=0.25)
    factors = [warm.lr_factor(s, 8) for s in range(8)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] < 0.2
    assert Attack(schedule="cosine").lr_factor(0, 10) == 1.0
    assert Attack().lr_factor(7, 10) == 1.0
    for name, cls in [("nesterov", torch.optim.SGD), ("adadelta", torch.optim.Adadelta)]:
        optimizer = Attack(optimizer=name).make_optimizer([nn.Parameter(torch.zeros(2))])
        assert isinstance(optimizer, cls)
    assert (
        Attack(optimizer="nesterov")
        .make_optimizer([nn.Parameter(torch.zeros(2))])
        .defaults["nesterov"]
    )


def test_bn_recal_probe_changes_only_statistics():
    model = _cnn()
    attack = Attack(scope="head_only", probe="bn_recal", epochs=0)
    result = run_attack(model, _data(20), _data(5), attack, keep_model=True)
    after = result["model"].state_dict()
    for key, value in model.state_dict().items():
        same = torch.equal(value, after[key])
        assert same != ("running" in key or "num_batches" in key), key


def _tiny_eval(tmp_path, workers=1, **overrides):
    grid = {
        "epochs": 2,
        "seeds": [0, 1],
        "benign_epochs": 1,
        "sweep": [
            {"scope": ["full", "reinit_head_full"], "optimizer": "adam", "lr": 1e-2},
            {"scope": "lora", "optimizer": "momentum", "lr": 1e-1, "batch_size": 16},
        ],
        "search": {"trials": 1, "sampler": "random"},
    }
    grid.update(overrides)
    return evaluate(
        _cnn(0),
        (_data(30), _data(11, seed=1)),
        original=_data(9, seed=2),
        normal=_cnn(1),
        attacks=grid,
        benign=(_data(20, 2, 5, seed=3), _data(8, 2, 5, seed=4)),
        workers=workers,
        report_dir=tmp_path,
    )


def _without_timing(data):
    if isinstance(data, dict):
        return {k: _without_timing(v) for k, v in data.items() if k not in ("seconds", "workers")}
    if isinstance(data, list):
        return [_without_timing(v) for v in data]
    return data


def test_evaluate_report_schema_and_resume(tmp_path):
    report = _tiny_eval(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    for arm in ("protected", "normal", "scratch"):
        worst = data["arms"][arm]["worst_case"]
        assert 0 <= worst["restricted_accuracy"] <= 100
        cells = data["arms"][arm]["cells"]
        # 3 grid recipes x 2 seeds + 1 search trial + 2 trainability cells
        assert len(cells) == 9
        for cell in cells:
            assert {"attack", "seed", "curve", "auc", "epochs_to_target"} <= set(cell)
            assert len(cell["curve"]) == (2 if cell["kind"] == "trainability" else 3)
        assert data["arms"][arm]["trainability"]["final_mean"] is not None
        assert data["summary"]["arms"][arm]["scratch_ratio"] is not None
    assert data["summary"]["protected_minus_scratch_worst"] == pytest.approx(
        data["arms"]["protected"]["worst_case"]["restricted_accuracy"]
        - data["arms"]["scratch"]["worst_case"]["restricted_accuracy"]
    )
    for name in ("report.md", "curves.png", "worst_case.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| protected |" in report.markdown()

    # an interrupted run: drop some cells, rerun, get the same report
    cell_files = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cell_files) == 27
    for path in cell_files[::3]:
        path.unlink()
    resumed = _tiny_eval(tmp_path)
    assert _without_timing(resumed.data) == _without_timing(report.data)


def test_evaluate_parallel_workers_match_in_process(tmp_path):
    grid = {"sweep": [{"scope": "full", "optimizer": "adam", "lr": 1e-2}], "seeds": [0]}
    grid["search"] = {"trials": 0}
    grid["benign"] = None
    one = evaluate(_cnn(), (_data(20), _data(7, seed=1)), attacks=grid, epochs=1)
    two = evaluate(_cnn(), (_data(20), _data(7, seed=1)), attacks=grid, epochs=1, workers=2)
    assert _without_timing(one.data) == _without_timing(two.data)


def test_grids_are_valid_and_quick_covers_hard_cases():
    quick, default = load_grid(quick=True), load_grid()
    scopes = {a.scope for a in quick.attacks}
    assert {"full", "reinit_head_full", "lora"} <= scopes  # H1, H7
    assert {"adam", "adadelta", "adagrad"} <= {a.optimizer for a in quick.attacks}  # H2
    assert "warmup_cosine" in {a.schedule for a in quick.attacks}  # H7
    assert set(SCOPES) == {a.scope for a in default.attacks}
    assert len(default.attacks) > 50 and default.search["trials"] >= 20
    assert QUICK_GRID["epochs"] < DEFAULT_GRID["epochs"]


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"sweep": [{"scope": "everything"}]}, "scope must be one of"),
        ({"sweep": [{"optimizer": "lion"}]}, "'lion' is not one of"),
        ({"sweep": [{"lr": -1.0}]}, "lr must be > 0"),
        ({"sweep": [{"data_fraction": 0}]}, r"data_fraction must be in \(0, 1\]"),
        ({"sweep": [{"learning_rate": 1e-3}]}, "unknown attack field"),
        ({"epochs": 0, "sweep": [{}]}, "epochs: expected an int >= 1"),
        ({"seeds": [], "sweep": [{"scope": "full"}]}, "seeds"),
        ({"sweeps": []}, "unknown key"),
        ({"sweep": []}, "no attacks"),
        ({"sweep": [{"scope": "full"}], "search": {"sampler": "grid"}}, "sampler"),
    ],
)
def test_bad_grids_are_rejected(grid, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GridConfig(grid)


def test_recipes_that_do_not_fit_the_model_fail_before_any_work():
    torch.manual_seed(0)
    vgg = VGGSmall(num_classes=3, in_channels=1, image_size=8)
    data = (_data(10, side=8), _data(5, side=8))
    grid = {"sweep": [{"scope": "bn_only"}], "benign": None, "search": {"trials": 0}}
    with pytest.raises(ValueError, match="bn_only needs normalisation layers"):
        evaluate(vgg, data, attacks=grid)
    grid = {"sweep": [{"scope": "last_k", "last_k": 99}], "benign": None}
    with pytest.raises(ValueError, match="last_k=99"):
        evaluate(_cnn(), (_data(10), _data(5)), attacks=grid)
    with pytest.raises(ValueError, match="workers"):
        evaluate(_cnn(), (_data(10), _data(5)), attacks=grid, workers=0)
    with pytest.raises(TypeError, match="attacks must be"):
        evaluate(_cnn(), (_data(10), _data(5)), attacks=42)


def test_apply_scope_freezes_the_rest():
    model = _cnn()
    params = apply_scope(model, Attack(scope="head_only"), torch.Generator().manual_seed(0))
    assert [p is model.fc.weight or p is model.fc.bias for p in params] == [True, True]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
