"""ProtectConfig's declared field rules: every field has exactly one, each rule kind refuses a bad
value with its usual exception and message, the cross-field checks and the generation-mode
refusals keep their place, and the speed options' validation is the same object at both paths."""

import dataclasses
import re
import warnings

import pytest
import torch

import sophon_fast.engine.options as engine_options_module
import sophon_fast.engine_options as low_options
from sophon_fast.config import (
    _GENERATION_FIELDS,
    _RULES,
    GENERATION_LOSSES,
    OFFICIAL_TIMESTEP,
    ProtectConfig,
    resolve_timesteps,
    validate_generation_config,
)

GENERATION = {"mode": "generation", "loss": "dos"}


def test_every_field_has_one_declared_rule():
    names = [f.name for f in dataclasses.fields(ProtectConfig)]
    assert sorted(_RULES) == sorted(names)
    assert all(callable(rule) for rule in _RULES.values())


def test_generation_fields_are_grouped_last_in_class_and_table():
    names = [f.name for f in dataclasses.fields(ProtectConfig)]
    group = set(_GENERATION_FIELDS)
    assert set(names[-len(group) :]) == group
    assert set(list(_RULES)[-len(group) :]) == group


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        # _Int: type, range, the 2**62 cap, None where allowed
        ({"inner_steps": 2.0}, TypeError, "ProtectConfig.inner_steps: expected an int, got 2.0 (float)"),
        ({"batch_size": True}, TypeError, "ProtectConfig.batch_size: expected an int, got True (bool)"),
        ({"ntr_steps": -1}, ValueError, "ProtectConfig.ntr_steps: expected an int in [0, 2**62], got -1"),
        ({"seed": 2**70}, ValueError, f"ProtectConfig.seed: expected an int in [0, 2**62], got {2**70}"),
        ({"eval_size": 0}, ValueError, "ProtectConfig.eval_size: expected an int in [1, 2**62], got 0"),
        # _Float: type, finite and positive / non-negative
        ({"beta": "5"}, TypeError, "ProtectConfig.beta: expected a number, got '5' (str)"),
        ({"alpha": float("nan")}, ValueError, "ProtectConfig.alpha: expected a finite number > 0, got nan"),
        ({"max_grad_norm": 0.0}, ValueError, "ProtectConfig.max_grad_norm: expected a finite number > 0, got 0.0"),
        ({"guard_threshold": -1}, ValueError, "ProtectConfig.guard_threshold: expected a finite number >= 0, got -1.0"),
        # learning rates
        ({"inner_lr": 1e40}, ValueError, "ProtectConfig.inner_lr: expected a learning rate <= 1e+30, got 1e+40"),
        ({"base_lr": 1e200}, ValueError, "ProtectConfig.alpha * base_lr: expected a learning rate <= 1e+30, got 3e+200"),
        # _Choice
        ({"guard_mode": "percent"}, ValueError, "ProtectConfig.guard_mode: expected one of ['absolute', 'relative'], got 'percent'"),
        ({"mode": "diffusion"}, ValueError, "ProtectConfig.mode: expected one of ['classification', 'generation'], got 'diffusion'"),
        ({"dtype": torch.float16}, ValueError, "ProtectConfig.dtype: expected one of ['float32', 'float64'], got 'float16'"),
        # _Bool
        ({"restore_bn": 1}, TypeError, "ProtectConfig.restore_bn: expected a bool, got 1"),
        ({"reinit_head": "yes"}, TypeError, "ProtectConfig.reinit_head: expected True, False or None, got 'yes'"),
        # custom rules
        ({"order": True}, ValueError, "ProtectConfig.order: expected 1 or 2, got True"),
        ({"head": 3}, TypeError, "ProtectConfig.head: expected a dotted module name or None, got 3"),
        ({"adversaries": ()}, ValueError, "ProtectConfig.adversaries: expected a non-empty sequence of adversaries, got ()"),
        ({"adversaries": [("adam", 1e200)]}, ValueError, "ProtectConfig.adversaries: adam lr 1e+200 is above 1e+30; expected a usable learning rate"),
        ({"engine": "reference", "engine_options": {}}, ValueError, "ProtectConfig.engine_options: only the fast engine takes options"),
        ({"engine_options": {"bogus": 1}}, ValueError, "engine_options: unknown options ['bogus']; expected some of"),
        ({"loss": "ce"}, ValueError, "ProtectConfig.loss: expected one of ['ice', 'ice_paper', 'klu'], got 'ce' ('ce' is the adaptation/NTR loss"),
        ({"timesteps": "all"}, ValueError, "ProtectConfig.timesteps: a generation-mode option; set mode='generation' or leave it None"),
        ({**GENERATION, "loss": "ice"}, ValueError, "ProtectConfig.loss: mode='generation' takes one of ['mse_ascent', 'dos'], got 'ice'"),
        ({**GENERATION, "noise_schedule": "sqrt"}, ValueError, "ProtectConfig.noise_schedule: expected one of ['linear', 'cosine'], got 'sqrt'"),
        ({**GENERATION, "diffusion_steps": "x"}, ValueError, "ProtectConfig.diffusion_steps: expected an int >= 2, got 'x'"),
        ({**GENERATION, "timesteps": "3:1"}, ValueError, "ProtectConfig.timesteps: range '3:1' is empty (expected a <= b)"),
        # cross-field checks
        ({"batch_size": 8, "adapt_size": 8}, ValueError, "ProtectConfig.adapt_size: expected 1 <= adapt_size < batch_size=8 (the rest of each batch evaluates), got 8"),
        ({"truncate": 2}, ValueError, "ProtectConfig.truncate: only meaningful with order=2"),
        ({"guard_threshold": 120.0}, ValueError, "ProtectConfig.guard_threshold: absolute mode takes a percentage in [0, 100], got 120.0"),
        ({"guard_mode": "relative"}, ValueError, "ProtectConfig.guard_threshold: relative mode takes a fraction of the starting accuracy in (0, 1], got 80.0"),
        # generation refusals come before those fields' own rules, so they name the mode
        ({**GENERATION, "head": 3}, ValueError, "ProtectConfig.head: mode='generation' has no classifier head, got head=3"),
        ({**GENERATION, "reinit_head": "yes"}, ValueError, "ProtectConfig.reinit_head: a noise-prediction model has no classification head"),
        ({**GENERATION, "guard_threshold": "x"}, ValueError, "ProtectConfig.guard_threshold / guard_mode: the intactness guard reads"),
        ({**GENERATION, "engine_options": {"cuda_graphs": "on"}}, ValueError, "ProtectConfig.engine_options: cuda_graphs='on' is not available in mode='generation'"),
        ({**GENERATION, "engine_options": {"vmap_adversaries": True}}, ValueError, "ProtectConfig.engine_options: vmap_adversaries=True is not available in mode='generation'"),
        ({**GENERATION, "engine_options": 5}, TypeError, "engine_options: expected a dict, FastOptions or None, got int"),
    ],
)  # fmt: skip
def test_each_rule_kind_keeps_its_exception_and_message(kwargs, error, message):
    with pytest.raises(error) as info:
        ProtectConfig(**kwargs)
    assert type(info.value) is error
    assert str(info.value).startswith(message), str(info.value)


def test_rules_normalise_values_and_revalidation_is_idempotent():
    config = ProtectConfig(
        inner_lr=1,
        dtype=torch.float64,
        adversaries=[("adam", 0.01)],
        engine_options={"channels_last": False},
    )
    assert config.inner_lr == 1.0 and isinstance(config.inner_lr, float)
    assert config.dtype == "float64"
    assert [(a.name, a.lr) for a in config.adversaries] == [("adam", 0.01)]
    assert config.engine_options == dataclasses.asdict(low_options.FastOptions(channels_last=False))
    assert dataclasses.replace(config) == config
    generation = ProtectConfig(**GENERATION, timesteps=(4, 3))
    assert generation.timesteps == [4, 3]
    assert dataclasses.replace(generation) == generation


def test_guard_off_warning_points_at_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ProtectConfig(eval_every=0)
    assert [str(w.message) for w in caught] == [
        "ProtectConfig: eval_every is 0/None, so the intactness guard is off"
    ]
    assert caught[0].filename == __file__


def test_generation_helpers_live_with_the_config():
    assert GENERATION_LOSSES == ("mse_ascent", "dos")
    assert resolve_timesteps(None, 1000) == [OFFICIAL_TIMESTEP] == [1]
    assert resolve_timesteps("2:4", 10) == [2, 3, 4]
    config = ProtectConfig(**GENERATION)
    config.timesteps = (5,)
    validate_generation_config(config)
    assert config.timesteps == [5]
    config.head = "fc"
    with pytest.raises(ValueError, match=re.escape("mode='generation' has no classifier head")):
        validate_generation_config(config)


def test_speed_options_are_one_definition_at_both_paths():
    for name in ("AUTO_DEFAULTS", "FastOptions", "bn_relu_pool_available", "resolve_options"):
        assert getattr(engine_options_module, name) is getattr(low_options, name)
