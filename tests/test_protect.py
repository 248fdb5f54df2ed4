"""protect(): engine equivalence over outer steps, guard, cadence, callbacks, data handling,
validation before training, checkpoints and resume, save / load."""

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sophon_fast.api import ProtectConfig, ProtectResult, protect
from sophon_fast.data import ImageDataset
from sophon_fast.engine.flat import FlatParams
from sophon_fast.models import SmallCNN

WEIGHTS_ATOL = 1e-12  # fast vs reference, 3 outer steps, float64: 7.5e-15 measured (133x)
LOSS_RTOL = 1e-13  # the same runs' losses: 4.8e-16 measured (200x)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with 2 OpenMP threads on shared cores, libgomp's spin-wait makes each op
    ~100x slower (1.3 s vs 9 ms for one simulation here); one thread avoids it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_cnn(seed=0, classes=3):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=classes, in_channels=1, image_size=8, widths=(3, 4))


def domains(classes=3, n_original=40, n_restricted=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    original = (
        torch.randn(n_original, 1, 8, 8, generator=g),
        torch.randint(0, classes, (n_original,), generator=g),
    )
    restricted = (
        torch.randn(n_restricted, 1, 8, 8, generator=g) + 0.5,
        torch.randint(0, classes, (n_restricted,), generator=g),
    )
    return original, restricted


def tiny_config(**overrides):
    base = dict(
        dtype="float64",
        inner_steps=3,
        batch_size=8,
        adapt_size=5,
        outer_steps=3,
        base_lr=1e-2,
        guard_threshold=None,
    )
    base.update(overrides)
    return ProtectConfig(**base)


def assert_same_state(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        if atol == 0.0:
            assert torch.equal(sa[name], sb[name]), name
        else:
            assert float((sa[name] - sb[name]).abs().max()) <= atol, name


def moved(result_model, start_model):
    start = {k: v.double() for k, v in start_model.state_dict().items()}
    return max(
        float((v - start[k]).abs().max())
        for k, v in result_model.state_dict().items()
        if v.is_floating_point()
    )


# ---------------------------------------------------------------- engines agree over whole runs


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(
    "adversary", [("sgd", 0.1), ("momentum", 0.1), ("adam", 0.01)], ids=lambda a: a[0]
)
def test_engines_give_the_same_weights_after_three_outer_steps(order, adversary):
    model = tiny_cnn()
    original, restricted = domains()
    results = {
        engine: protect(
            model,
            original,
            restricted,
            tiny_config(order=order, adversaries=(adversary,), engine=engine),
            progress=False,
        )
        for engine in ("fast", "reference")
    }
    assert_same_state(results["fast"].model, results["reference"].model, atol=WEIGHTS_ATOL)
    assert (
        moved(results["fast"].model, model) > 1e-3
    )  # the runs did train, so the comparison means something
    for fast, ref in zip(results["fast"].history, results["reference"].history):
        assert fast["adversaries"] == ref["adversaries"]
        assert fast["original_accuracy"] == ref["original_accuracy"]
        assert math.isclose(fast["suppression_loss"], ref["suppression_loss"], rel_tol=LOSS_RTOL)
        assert math.isclose(fast["ntr_loss"], ref["ntr_loss"], rel_tol=LOSS_RTOL)


@pytest.mark.parametrize("sampling", ["one", "all"])
def test_engines_agree_with_several_adversaries_and_no_bn_restore(sampling):
    model = tiny_cnn()
    original, restricted = domains()
    adversaries = (("sgd", 0.1), ("adam", 0.01, {"betas": (0.8, 0.99)}), ("rmsprop", 0.01))
    config = dict(
        adversaries=adversaries,
        adversary_sampling=sampling,
        restore_bn=False,
        outer_steps=4,
        loss="klu",
    )
    fast = protect(model, original, restricted, tiny_config(**config), progress=False)
    ref = protect(
        model, original, restricted, tiny_config(**config, engine="reference"), progress=False
    )
    assert_same_state(fast.model, ref.model, atol=WEIGHTS_ATOL)
    used = [h["adversaries"] for h in fast.history]
    assert used == [h["adversaries"] for h in ref.history]
    if sampling == "all":
        assert all(len(u) == 3 for u in used)
    else:
        assert all(len(u) == 1 for u in used)


def test_engines_agree_with_several_steps_per_outer_step_and_no_clipping():
    model = tiny_cnn()
    original, restricted = domains()
    config = dict(
        suppression_steps=2,
        ntr_steps=2,
        loss="ice_paper",
        order=2,
        truncate=1,
        max_grad_norm=None,
        adversaries=(("nesterov", 0.1), ("adamw", 0.01)),
    )
    fast = protect(model, original, restricted, tiny_config(**config), progress=False)
    ref = protect(
        model, original, restricted, tiny_config(**config, engine="reference"), progress=False
    )
    assert_same_state(fast.model, ref.model, atol=WEIGHTS_ATOL)
    assert all(len(h["adversaries"]) == 2 for h in fast.history)
    assert [h["adversaries"] for h in fast.history] == [h["adversaries"] for h in ref.history]


def test_protect_does_not_touch_the_callers_model():
    model = tiny_cnn()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original, restricted = domains()
    result = protect(model, original, restricted, tiny_config(outer_steps=1), progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) and value.dtype == before[name].dtype, name
    assert result.model is not model and not result.model.training
    assert next(result.model.parameters()).dtype == torch.float64


# ---------------------------------------------------------------- history, cadence, guard, callbacks


def test_history_records_and_eval_cadence():
    model = tiny_cnn()
    original, restricted = domains()
    result = protect(
        model, original, restricted, tiny_config(outer_steps=4, eval_every=2), progress=False
    )
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert [h["original_accuracy"] is None for h in result.history] == [True, False, True, False]
    for record in result.history:
        assert set(record) == {
            "step",
            "suppression_loss",
            "restricted_accuracy",
            "ntr_loss",
            "original_accuracy",
            "adversaries",
            "guard",
            "seconds",
        }
        assert math.isfinite(record["suppression_loss"]) and math.isfinite(record["ntr_loss"])
        assert 0.0 <= record["restricted_accuracy"] <= 100.0 and record["seconds"] > 0
        assert record["adversaries"] == ["sgd(lr=0.0001)"]
    assert result.initial_original_accuracy is not None


def test_original_eval_is_what_the_history_measures():
    model = tiny_cnn()
    original, restricted = domains()
    held_out = (torch.randn(13, 1, 8, 8), torch.randint(0, 3, (13,)))
    result = protect(
        model,
        original,
        restricted,
        tiny_config(outer_steps=2),
        original_eval=held_out,
        progress=False,
    )
    protected = result.model.eval()
    with torch.no_grad():
        correct = int((protected(held_out[0].double()).argmax(1) == held_out[1]).sum())
    assert result.history[-1]["original_accuracy"] == 100.0 * correct / 13


def test_eval_size_limits_the_evaluation_set():
    model = tiny_cnn()
    (ox, oy), restricted = domains()
    limited = protect(
        model, (ox, oy), restricted, tiny_config(outer_steps=2, eval_size=7), progress=False
    )
    explicit = protect(
        model,
        (ox, oy),
        restricted,
        tiny_config(outer_steps=2),
        original_eval=(ox[:7], oy[:7]),
        progress=False,
    )
    full = protect(model, (ox, oy), restricted, tiny_config(outer_steps=2), progress=False)
    accuracies = [[h["original_accuracy"] for h in r.history] for r in (limited, explicit, full)]
    assert accuracies[0] == accuracies[1] != accuracies[2]
    assert limited.initial_original_accuracy == explicit.initial_original_accuracy


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_guard_rollback_and_stop(engine):
    model = tiny_cnn()
    original, restricted = domains()
    result = protect(
        model,
        original,
        restricted,
        tiny_config(guard_threshold=100.0, engine=engine),
        progress=False,
    )
    assert len(result.history) == 1 and result.history[0]["guard"] == "rollback_stop"
    assert result.stopped_by == "guard"
    assert_same_state(result.model, model.double())  # restored to the step's backup, bit for bit


def test_guard_rollback_and_continue():
    model = tiny_cnn()
    original, restricted = domains()
    result = protect(
        model,
        original,
        restricted,
        tiny_config(guard_threshold=100.0, guard_action="continue"),
        progress=False,
    )
    assert [h["guard"] for h in result.history] == ["rollback_continue"] * 3
    assert result.stopped_by is None
    assert_same_state(result.model, model.double())


def test_relative_guard_threshold_uses_the_starting_accuracy():
    model = tiny_cnn()
    original, restricted = domains()
    # a fraction 1.0 of the starting accuracy fires as soon as accuracy does not improve; with a
    # tiny fraction it never fires
    quiet = protect(
        model,
        original,
        restricted,
        tiny_config(guard_threshold=1e-9, guard_mode="relative"),
        progress=False,
    )
    assert all(h["guard"] is None for h in quiet.history)
    strict = protect(
        model,
        original,
        restricted,
        tiny_config(guard_threshold=1.0, guard_mode="relative", guard_action="continue"),
        progress=False,
    )
    start = strict.initial_original_accuracy
    for record in strict.history:
        assert (record["guard"] is not None) == (record["original_accuracy"] <= start)


def test_eval_every_zero_disables_the_guard_with_a_warning():
    with pytest.warns(UserWarning, match="guard is off"):
        config = tiny_config(eval_every=0, guard_threshold=80.0)
    model = tiny_cnn()
    original, restricted = domains()
    result = protect(model, original, restricted, config, progress=False)
    assert all(h["original_accuracy"] is None and h["guard"] is None for h in result.history)


def test_callback_true_stops_training():
    seen = []

    def stop_after_two(record):
        seen.append(record["step"])
        return record["step"] == 2

    result = protect(
        tiny_cnn(),
        *domains(),
        tiny_config(outer_steps=5),
        callbacks=(stop_after_two,),
        progress=False,
    )
    assert seen == [1, 2] and len(result.history) == 2 and result.stopped_by == "callback"


def test_zero_ntr_steps_runs():
    result = protect(
        tiny_cnn(), *domains(), tiny_config(ntr_steps=0, outer_steps=2), progress=False
    )
    assert all(h["ntr_loss"] is None for h in result.history)


# ---------------------------------------------------------------- data forms


def test_dataset_and_dataloader_inputs_equal_tensor_inputs():
    model = tiny_cnn()
    (ox, oy), (rx, ry) = domains()
    config = tiny_config(outer_steps=2)
    reference = protect(model, (ox, oy), (rx, ry), config, progress=False)
    as_datasets = protect(
        model, ImageDataset(ox, oy, 3), TensorDataset(rx, ry), config, progress=False
    )
    as_loaders = protect(
        model,
        DataLoader(TensorDataset(ox, oy), batch_size=7),
        DataLoader(TensorDataset(rx, ry), batch_size=11),
        config,
        progress=False,
    )

    class PlainDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(ry)

        def __getitem__(self, i):
            return rx[i], int(ry[i])

    plain = protect(model, (ox, oy), PlainDataset(), config, progress=False)
    for other in (as_datasets, as_loaders, plain):
        assert_same_state(reference.model, other.model)


# ---------------------------------------------------------------- validation before training


class _NeverCalled:
    def __init__(self):
        self.calls = 0

    def __call__(self, record):
        self.calls += 1


@pytest.mark.parametrize(
    "original, restricted, error, match",
    [
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))),
            (torch.randn(30, 1, 8, 8), torch.full((30,), 3)),
            ValueError,
            "restricted",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (39,))),
            (torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))),
            ValueError,
            "original",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,)).float()),
            (torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))),
            ValueError,
            "original",
        ),
        (
            (torch.full((40, 1, 8, 8), float("nan")), torch.randint(0, 3, (40,))),
            (torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))),
            ValueError,
            "original",
        ),
        (
            (torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)),
            (torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))),
            ValueError,
            "original",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))),
            (torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))),
            ValueError,
            "fewer than batch_size",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))),
            (torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))),
            ValueError,
            "differ in shape",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))),
            "not data",
            TypeError,
            "restricted",
        ),
        (
            (torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))),
            DataLoader(TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))),
            ValueError,
            "no batches",
        ),
    ],
    ids=[
        "label-range",
        "length-mismatch",
        "float-labels",
        "non-finite",
        "empty",
        "too-few",
        "shape-mismatch",
        "wrong-type",
        "empty-loader",
    ],
)
def test_bad_data_raises_before_training(original, restricted, error, match):
    never = _NeverCalled()
    with pytest.raises(error, match=match):
        protect(tiny_cnn(), original, restricted, tiny_config(), callbacks=(never,), progress=False)
    assert never.calls == 0


def test_class_count_mismatch_raises():
    (ox, oy), restricted = domains()
    with pytest.raises(ValueError, match="5 classes but the model has 3 outputs"):
        protect(tiny_cnn(), ImageDataset(ox, oy, 5), restricted, tiny_config(), progress=False)
    with pytest.raises(ValueError, match="2 classes but the model has 3 outputs"):
        protect(
            tiny_cnn(),
            ImageDataset(ox, oy.clamp(max=1), 2),
            restricted,
            tiny_config(),
            progress=False,
        )
    # fewer restricted classes than outputs is fine: the labels fit the head
    protect(
        tiny_cnn(),
        (ox, oy),
        ImageDataset(restricted[0], restricted[1].clamp(max=1), 2),
        tiny_config(outer_steps=1),
        progress=False,
    )


def test_bad_arguments_raise():
    original, restricted = domains()
    with pytest.raises(TypeError, match="ProtectConfig"):
        protect(tiny_cnn(), original, restricted, {"loss": "ice"})
    with pytest.raises(ValueError, match="checkpoint_dir"):
        protect(tiny_cnn(), original, restricted, tiny_config(), resume=True)
    with pytest.raises(ValueError, match="no submodule"):
        protect(tiny_cnn(), original, restricted, tiny_config(head="classifier"))
    frozen = tiny_cnn()
    frozen.fc.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="fc.bias"):
        protect(frozen, original, restricted, tiny_config())


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("loss", "ce", ValueError, "adaptation/NTR loss"),
        ("loss", "mse", ValueError, "loss"),
        ("inner_steps", 0, ValueError, "inner_steps"),
        ("inner_steps", 2.0, TypeError, "inner_steps"),
        ("inner_steps", True, TypeError, "inner_steps"),
        ("batch_size", -1, ValueError, "batch_size"),
        ("adapt_size", 150, ValueError, "adapt_size"),
        ("adapt_size", 0, ValueError, "adapt_size"),
        ("inner_lr", 0.0, ValueError, "inner_lr"),
        ("alpha", float("nan"), ValueError, "alpha"),
        ("beta", "5", TypeError, "beta"),
        ("base_lr", -1e-4, ValueError, "base_lr"),
        ("ntr_steps", -1, ValueError, "ntr_steps"),
        ("suppression_steps", 0, ValueError, "suppression_steps"),
        ("outer_steps", 0, ValueError, "outer_steps"),
        ("max_grad_norm", 0.0, ValueError, "max_grad_norm"),
        ("reinit_head", "yes", TypeError, "reinit_head"),
        ("restore_bn", 1, TypeError, "restore_bn"),
        ("order", 3, ValueError, "order"),
        ("truncate", 2, ValueError, "truncate"),
        ("adversaries", (), ValueError, "adversaries"),
        ("adversaries", ("sgd", 1e-4), TypeError, "adversaries"),
        ("adversaries", (("lion", 1e-4),), ValueError, "lion"),
        ("adversary_sampling", "some", ValueError, "adversary_sampling"),
        ("guard_threshold", 120.0, ValueError, "guard_threshold"),
        ("guard_mode", "percent", ValueError, "guard_mode"),
        ("guard_action", "ignore", ValueError, "guard_action"),
        ("eval_every", -1, ValueError, "eval_every"),
        ("eval_size", 0, ValueError, "eval_size"),
        ("eval_batch_size", 0, ValueError, "eval_batch_size"),
        ("seed", -3, ValueError, "seed"),
        ("engine", "turbo", ValueError, "engine"),
        ("dtype", "float16", ValueError, "dtype"),
        ("checkpoint_every", 0, ValueError, "checkpoint_every"),
        ("head", 3, TypeError, "head"),
    ],
)
def test_config_validation(field, value, error, match):
    with pytest.raises(error, match=match):
        ProtectConfig(**{field: value})


def test_config_relative_guard_range_and_truncate_with_order_2():
    with pytest.raises(ValueError, match="fraction"):
        ProtectConfig(guard_mode="relative", guard_threshold=80.0)
    assert ProtectConfig(guard_mode="relative", guard_threshold=0.9).guard_threshold == 0.9
    assert ProtectConfig(order=2, truncate=5).truncate == 5


def test_config_defaults_are_the_official_run():
    config = ProtectConfig()
    assert (
        config.loss,
        config.inner_steps,
        config.inner_lr,
        config.batch_size,
        config.adapt_size,
    ) == ("ice", 50, 1e-4, 150, 130)
    assert (config.alpha, config.beta, config.base_lr, config.max_grad_norm) == (
        3.0,
        5.0,
        1e-4,
        0.5,
    )
    assert (config.suppression_steps, config.ntr_steps, config.outer_steps, config.order) == (
        1,
        1,
        1000,
        1,
    )
    assert (config.guard_threshold, config.guard_mode, config.guard_action, config.seed) == (
        80.0,
        "absolute",
        "stop",
        99,
    )
    assert [(a.name, a.lr) for a in config.adversaries] == [("sgd", 1e-4)]
    assert config.reinit_head_resolved and not ProtectConfig(loss="klu").reinit_head_resolved
    assert ProtectConfig(dtype=torch.float64).dtype == "float64"
    assert ProtectConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown fields"):
        ProtectConfig.from_dict({"inner_stepz": 3})


# ---------------------------------------------------------------- checkpoints, resume, save / load


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_resume_is_bit_identical(tmp_path, engine):
    model = tiny_cnn()
    original, restricted = domains()
    config = tiny_config(
        outer_steps=4, engine=engine, adversaries=(("adam", 0.01), ("momentum", 0.1))
    )
    straight = protect(model, original, restricted, config, progress=False)
    halfway = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    protect(model, original, restricted, halfway, checkpoint_dir=tmp_path, progress=False)
    resumed = protect(
        model, original, restricted, config, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert_same_state(straight.model, resumed.model)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]


def test_resume_reads_the_checkpoint(tmp_path):
    """Runs are deterministic, so a restart from scratch reproduces the straight run: the test
    above passes even if resume ignored the checkpoint. Here the checkpoint was written from
    another model (seed 1) than the one passed when resuming (seed 0): only a resume that reads
    it reproduces the seed-1 run, and only steps 3 and 4 may run after it."""
    original, restricted = domains()
    config = tiny_config(outer_steps=4)
    straight = protect(tiny_cnn(seed=1), original, restricted, config, progress=False)
    fresh = protect(tiny_cnn(seed=0), original, restricted, config, progress=False)
    halfway = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    protect(
        tiny_cnn(seed=1), original, restricted, halfway, checkpoint_dir=tmp_path, progress=False
    )
    ran = []
    resumed = protect(
        tiny_cnn(seed=0), original, restricted, config, checkpoint_dir=tmp_path, resume=True,
        progress=False, callbacks=[lambda record: ran.append(record["step"])],
    )  # fmt: skip
    assert ran == [3, 4]
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert_same_state(straight.model, resumed.model)
    assert not torch.equal(fresh.model.fc.weight, resumed.model.fc.weight)


def test_resume_carries_a_changed_checkpoint_through(tmp_path):
    """Shift the weights stored in the checkpoint by 0.25: resuming with nothing left to run
    returns exactly the shifted weights, and one more step starts from them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_cnn()
    original, restricted = domains()
    config = tiny_config(outer_steps=2)
    first = protect(model, original, restricted, config, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert torch.equal(tensors["engine.model.params"], FlatParams.from_module(first.model).params)
    tensors["engine.model.params"] = tensors["engine.model.params"] + 0.25
    save_file(tensors, str(path), metadata=metadata)
    same = protect(
        model, original, restricted, config, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    for (name, a), b in zip(first.model.named_parameters(), same.model.parameters()):
        assert torch.equal(b, a + 0.25), name
    assert [h["step"] for h in same.history] == [1, 2]
    longer = tiny_config(outer_steps=3)
    straight = protect(model, original, restricted, longer, progress=False)
    more = protect(
        model, original, restricted, longer, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    drift = (more.model.fc.weight - straight.model.fc.weight).abs()
    assert float(drift.min()) > 0.1  # every weight still carries most of the 0.25 shift


def test_checkpoint_every_and_resume_errors(tmp_path):
    model = tiny_cnn()
    original, restricted = domains()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        protect(
            model,
            original,
            restricted,
            tiny_config(),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    seen = []
    import sophon_fast.engine.checkpoint as checkpoint_module

    real = checkpoint_module.save_checkpoint

    def spy(directory, tensors, meta):
        seen.append(meta["step"])
        real(directory, tensors, meta)

    checkpoint_module.save_checkpoint = spy
    try:
        protect(
            model,
            original,
            restricted,
            tiny_config(outer_steps=5, checkpoint_every=2),
            checkpoint_dir=tmp_path,
            progress=False,
        )
    finally:
        checkpoint_module.save_checkpoint = real
    assert seen == [2, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json",
        "checkpoint.safetensors",
    ]
    with pytest.raises(ValueError, match="differs from the checkpoint's in \\['seed'\\]"):
        protect(
            model,
            original,
            restricted,
            tiny_config(outer_steps=6, seed=1),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="engine"):
        protect(
            model,
            original,
            restricted,
            tiny_config(outer_steps=6, engine="reference"),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["step"] = 3
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        protect(
            model,
            original,
            restricted,
            tiny_config(outer_steps=6),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_save_load_round_trip(tmp_path):
    model = tiny_cnn()
    result = protect(model, *domains(), tiny_config(outer_steps=2), progress=False)
    result.save(tmp_path / "zoo")
    loaded = ProtectResult.load(tmp_path / "zoo")  # rebuilt from model_spec
    assert type(loaded.model) is SmallCNN
    assert_same_state(result.model, loaded.model)
    assert loaded.config == result.config and loaded.history == result.history
    assert loaded.initial_original_accuracy == result.initial_original_accuracy
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "zoo").iterdir())


def test_save_load_user_model_needs_an_instance(tmp_path):
    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU())
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.body(x))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no head named: the last Linear is used, with a warning
        result = protect(UserNet(), *domains(), tiny_config(outer_steps=1), progress=False)
    result.save(tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        ProtectResult.load(tmp_path)
    loaded = ProtectResult.load(tmp_path, model=UserNet())
    assert_same_state(result.model, loaded.model)
    with pytest.raises(ValueError, match="do not fit"):
        ProtectResult.load(tmp_path, model=tiny_cnn())


def test_progress_bar_and_denormal_flushing_on_cpu(capsys):
    tiny = torch.tensor([1e-310], dtype=torch.float64)  # a float64 denormal
    flushed_inside = []

    def probe(record):
        flushed_inside.append(float(tiny * 1.0) == 0.0)

    protect(tiny_cnn(), *domains(), tiny_config(outer_steps=2), callbacks=(probe,), progress=True)
    assert "protect" in capsys.readouterr().err  # the tqdm bar
    assert flushed_inside == [True, True]  # denormals flushed during the run ...
    assert float(tiny * 1.0) != 0.0  # ... and PyTorch's default restored after it


def test_unnamed_head_warns_once():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh())
            self.last = nn.Linear(5, 3)

        def forward(self, x):
            return self.last(self.body(x))

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        protect(Net(), *domains(), tiny_config(outer_steps=1), progress=False)
    messages = [str(w.message) for w in caught if "no classifier head named" in str(w.message)]
    assert len(messages) == 1 and "'last'" in messages[0]
