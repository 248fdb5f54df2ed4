"""The intactness guard rolls back to the last *evaluated*-good state, and says so when it rolled
back everything.

At fdbb492, with ``eval_every > 1`` a rollback restored the backup taken at the start of the
failing step, i.e. the state after the previous, never evaluated step, which may already be ruined
(a 89.7 % model came back at 9.9 % with ``stopped_by="guard"``); and ``guard_action="continue"``
rolling back every step reported completion. The accuracy the guard reads is scripted here (per
step) so each case is exact.
"""

from __future__ import annotations

import pytest
import torch
from _problems import tiny_cnn

from sophon_fast.api import ProtectConfig, protect
from sophon_fast.engine.outer import ProtectionRun


def config(**overrides):
    base = dict(dtype="float64", inner_steps=3, batch_size=8, adapt_size=5, outer_steps=4,
                base_lr=1e-2, guard_threshold=80.0, eval_every=2)  # fmt: skip
    base.update(overrides)
    return ProtectConfig(**base)


def script_accuracy(monkeypatch, by_step: dict[int, float]):
    """original_accuracy() returns ``by_step[run.step]`` (step 0: the starting accuracy)."""
    monkeypatch.setattr(ProtectionRun, "original_accuracy", lambda self: by_step[self.step])


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_rollback_with_eval_every_2_lands_on_the_last_evaluated_good_state(monkeypatch):
    model, original, restricted = tiny_cnn()
    script_accuracy(monkeypatch, {0: 90.0, 2: 89.0, 4: 9.9})
    two_steps = protect(model, original, restricted, config(outer_steps=2), progress=False)
    three_steps = protect(model, original, restricted, config(outer_steps=3), progress=False)
    result = protect(model, original, restricted, config(), progress=False)
    assert result.stopped_by == "guard"
    assert [h["guard"] for h in result.history] == [None, None, None, "rollback_stop"]
    assert_same(result.model, two_steps.model)  # evaluated at 89 %, not step 3's unmeasured state
    with pytest.raises(AssertionError):
        assert_same(result.model, three_steps.model)


def test_a_first_evaluation_failing_returns_the_starting_model(monkeypatch):
    model, original, restricted = tiny_cnn()
    script_accuracy(monkeypatch, {0: 90.0, 2: 5.0})
    result = protect(model, original, restricted, config(), progress=False)
    assert result.stopped_by == "guard" and len(result.history) == 2
    assert_same(result.model, model.double())


def test_continue_rolling_back_every_step_does_not_report_completion(monkeypatch):
    model, original, restricted = tiny_cnn()
    script_accuracy(monkeypatch, {0: 90.0, 1: 5.0, 2: 5.0, 3: 5.0})
    with pytest.warns(RuntimeWarning, match="rolled back every one of the 3 checked steps"):
        result = protect(
            model, original, restricted,
            config(outer_steps=3, eval_every=1, guard_action="continue"), progress=False,
        )  # fmt: skip
    assert result.stopped_by is None
    assert result.outcome.startswith("completion, but every one of the 3 checked steps")
    assert_same(result.model, model.double())


def test_resume_keeps_the_last_evaluated_good_state(monkeypatch, tmp_path):
    """The good state of step 2 is not the checkpoint's (step 3): it travels in the checkpoint,
    so a resumed run rolls back exactly where the uninterrupted run does."""
    model, original, restricted = tiny_cnn()
    script_accuracy(monkeypatch, {0: 90.0, 2: 89.0, 4: 9.9})
    straight = protect(model, original, restricted, config(), progress=False)
    protect(
        model, original, restricted, config(outer_steps=3), checkpoint_dir=tmp_path, progress=False
    )
    resumed = protect(model, original, restricted, config(), checkpoint_dir=tmp_path, resume=True,
                      progress=False)  # fmt: skip
    assert resumed.stopped_by == "guard"
    assert_same(resumed.model, straight.model)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]


def test_resume_in_continue_mode_rolls_back_like_the_uninterrupted_run(monkeypatch, tmp_path):
    model, original, restricted = tiny_cnn()
    script_accuracy(monkeypatch, {0: 90.0, 2: 89.0, 4: 9.9, 6: 70.0})
    cfg = config(outer_steps=7, guard_action="continue")
    straight = protect(model, original, restricted, cfg, progress=False)
    half = ProtectConfig.from_dict({**cfg.to_dict(), "outer_steps": 5})
    protect(model, original, restricted, half, checkpoint_dir=tmp_path, progress=False)
    resumed = protect(
        model, original, restricted, cfg, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert [h["guard"] for h in resumed.history] == [None] * 3 + [
        "rollback_continue",
        None,
        "rollback_continue",
        None,
    ]
    assert_same(resumed.model, straight.model)
