"""Non-finite values: protect() checks the suppression loss, the meta-gradient, the NTR loss and
the weights every outer step, rolls back to the last good state and stops (or continues, per
``guard_action``) with a warning naming the step and the quantity; save() refuses non-finite
weights; resume refuses a non-finite checkpoint; ``sophon-fast show`` warns.

At fdbb492 a NaN meta-gradient turned every weight into NaN and the run reported completion (a
NaN model scores ~10 % by argmax, so the accuracy guard cannot catch it). The NaN is injected by
wrapping the engine's meta step / NTR step at one chosen outer step.
"""

from __future__ import annotations

import math

import pytest
import torch
from _problems import tiny_cnn

from sophon_fast import cli
from sophon_fast.api import ProtectConfig, ProtectResult, protect
from sophon_fast.engine.inner import FastEngine
from sophon_fast.models import build_model
from sophon_fast.reference.sophon import ReferenceEngine


def config(**overrides):
    base = dict(dtype="float64", inner_steps=3, batch_size=8, adapt_size=5, outer_steps=3,
                base_lr=1e-2, guard_threshold=None)  # fmt: skip
    base.update(overrides)
    return ProtectConfig(**base)


def poison(monkeypatch, engine_cls, what: str, at_call: int):
    """At the ``at_call``-th outer step (1-based; one simulation and one NTR step per step) make
    the simulation return a NaN meta-gradient, the meta step leave an infinite weight, or the NTR
    step return a NaN loss."""
    calls = {"simulate": 0, "meta": 0, "ntr": 0}
    simulate, meta_step, ntr_step = engine_cls.simulate, engine_cls.meta_step, engine_cls.ntr_step

    def poisoned_simulate(self, *args, **kwargs):
        calls["simulate"] += 1
        loss, accuracy, grad = simulate(self, *args, **kwargs)
        if what == "meta-gradient" and calls["simulate"] == at_call:
            if isinstance(grad, dict):
                grad = {k: torch.full_like(v, math.nan) for k, v in grad.items()}
            else:
                grad = torch.full_like(grad, math.nan)
        return loss, accuracy, grad

    def poisoned_meta(self, grad, max_grad_norm):
        calls["meta"] += 1
        meta_step(self, grad, max_grad_norm)
        if what == "weights or statistics" and calls["meta"] == at_call:  # an overflow, say
            with torch.no_grad():
                next(iter(self.state_tensors().values())).view(-1)[0] = math.inf

    def poisoned_ntr(self, x, y, *args, **kwargs):
        calls["ntr"] += 1
        loss = ntr_step(self, x, y, *args, **kwargs)
        return loss * math.nan if what == "NTR loss" and calls["ntr"] == at_call else loss

    monkeypatch.setattr(engine_cls, "simulate", poisoned_simulate)
    monkeypatch.setattr(engine_cls, "meta_step", poisoned_meta)
    monkeypatch.setattr(engine_cls, "ntr_step", poisoned_ntr)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    "engine, what",
    [
        ("fast", "meta-gradient"),
        ("reference", "meta-gradient"),
        ("fast", "NTR loss"),
        ("fast", "weights or statistics"),
    ],
)
def test_a_nan_rolls_back_and_stops_naming_step_and_quantity(monkeypatch, engine, what):
    model, original, restricted = tiny_cnn()
    one_step = protect(
        model, original, restricted, config(outer_steps=1, engine=engine), progress=False
    )
    poison(monkeypatch, FastEngine if engine == "fast" else ReferenceEngine, what, at_call=2)
    # Weights poisoned by the meta step reach the NTR loss computed from them, which is checked
    # first; every backend's forward propagates the NaN (as eager ops do).
    named = ["NTR loss", what] if what == "weights or statistics" else [what]
    message = " \\(then ".join(named)
    with pytest.warns(RuntimeWarning, match=f"outer step 2: non-finite {message}.*step 1"):
        result = protect(model, original, restricted, config(engine=engine), progress=False)
    assert result.stopped_by == "nonfinite"
    assert [h["guard"] for h in result.history] == [None, "nonfinite_stop"]
    (event,) = result.events
    assert event["step"] == 2 and event["quantities"][: len(named)] == named
    assert event["rolled_back_to"] == 1
    assert_same(result.model, one_step.model)  # the state after step 1, bit for bit
    assert "completion" not in result.outcome and "non-finite" in result.outcome


def test_continue_restores_the_adam_states_too(monkeypatch):
    """With guard_action="continue" the run goes on from the last good state; the NaN moments
    of the poisoned step are dropped, so later steps are finite (they rolled back forever at
    fdbb492's loop, had it detected anything)."""
    model, original, restricted = tiny_cnn()
    poison(monkeypatch, FastEngine, "meta-gradient", at_call=2)
    with pytest.warns(RuntimeWarning, match="outer step 2: non-finite meta-gradient"):
        result = protect(
            model, original, restricted, config(outer_steps=4, guard_action="continue"),
            progress=False,
        )  # fmt: skip
    assert result.stopped_by is None
    assert [h["guard"] for h in result.history] == [None, "nonfinite_continue", None, None]
    assert all(
        torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point()
    )
    assert result.outcome == "completion (1 of 4 steps rolled back)"


def test_save_refuses_nonfinite_weights_unless_told(tmp_path):
    model, original, restricted = tiny_cnn()
    result = protect(model, original, restricted, config(outer_steps=1), progress=False)
    with torch.no_grad():
        result.model.fc.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite values in \\['fc.weight'\\]"):
        result.save(tmp_path / "refused")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    result.save(tmp_path / "forced", allow_nonfinite=True)
    assert (tmp_path / "forced" / ProtectResult.WEIGHTS).is_file()


def test_show_warns_about_nonfinite_weights(tmp_path, capsys):
    model, original, restricted = tiny_cnn()
    result = protect(model, original, restricted, config(outer_steps=1), progress=False)
    with torch.no_grad():
        result.model.fc.bias[1] = math.inf
    result.save(tmp_path, allow_nonfinite=True)
    assert cli.main(["show", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "fc.bias" in err


def test_resume_refuses_a_nonfinite_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, original, restricted = tiny_cnn()
    protect(
        model, original, restricted, config(outer_steps=2), checkpoint_dir=tmp_path, progress=False
    )
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    tensors["engine.model.params"][3] = math.nan
    save_file(tensors, str(path), metadata=header)  # same header: only the values changed
    with pytest.raises(ValueError, match="NaN or infinite values in \\['engine.model.params'\\]"):
        protect(model, original, restricted, config(outer_steps=3), checkpoint_dir=tmp_path,
                resume=True, progress=False)  # fmt: skip


def test_a_nonfinite_stop_is_not_resumed_past(tmp_path, monkeypatch):
    model, original, restricted = tiny_cnn()
    poison(monkeypatch, FastEngine, "meta-gradient", at_call=2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        first = protect(
            model, original, restricted, config(), checkpoint_dir=tmp_path, progress=False
        )
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stopped by a non-finite value; nothing left to resume"):
        again = protect(model, original, restricted, config(outer_steps=5), checkpoint_dir=tmp_path,
                        resume=True, progress=False)  # fmt: skip
    assert again.stopped_by == "nonfinite" and len(again.history) == 2
    assert_same(first.model, again.model)


def test_generation_mode_rolls_back_and_stops_too(monkeypatch):
    from sophon_fast.engine.generation import GenerationFastEngine

    torch.manual_seed(0)
    unet = {
        "in_channels": 1,
        "image_size": 8,
        "base_channels": 8,
        "channel_mults": [1, 2],
        "groups": 4,
    }
    model = build_model("unet", unet)
    g = torch.Generator().manual_seed(0)
    original = torch.rand(14, 1, 8, 8, generator=g) * 2 - 1
    restricted = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    cfg = dict(mode="generation", loss="dos", dtype="float64", inner_steps=2, batch_size=6,
               adapt_size=4, eval_size=4)  # fmt: skip
    one_step = protect(
        model, original, restricted, ProtectConfig(**cfg, outer_steps=1), progress=False
    )
    poison(monkeypatch, GenerationFastEngine, "meta-gradient", at_call=2)
    with pytest.warns(RuntimeWarning, match="outer step 2: non-finite meta-gradient"):
        result = protect(
            model, original, restricted, ProtectConfig(**cfg, outer_steps=3), progress=False
        )
    assert result.stopped_by == "nonfinite" and len(result.history) == 2
    assert_same(result.model, one_step.model)
