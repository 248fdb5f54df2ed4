"""Simulating a stronger attacker: the attacker distribution (one draw per simulation, recorded,
resumable) and the per-step weighting of the suppression loss, on every engine."""

import math

import pytest
import torch
from test_engine import TanhMLP, flat_grad, rel_err, restricted_draw, tiny_cnn
from test_protect import assert_same_state, domains, tiny_config

from sophon_fast.api import ProtectConfig, protect, simulate
from sophon_fast.engine.flat import FlatParams
from sophon_fast.engine.functional import FunctionalModel
from sophon_fast.engine.inner import simulate_flat
from sophon_fast.engine.sampling import EpochSampler, draw_simulation
from sophon_fast.engine.vmap import simulate_vmapped
from sophon_fast.losses import get_loss
from sophon_fast.reference.adversary_distribution import AdversaryDistribution
from sophon_fast.reference.optimizers import resolve_adversary
from sophon_fast.reference.probe import heldout_probe_r2
from sophon_fast.reference.trajectory import trajectory_weights

META_GRAD_RTOL = 1e-13  # fast vs reference in float64, as tests/test_engine.py

DISTRIBUTION = {
    "families": {
        "sgd": {"lr": (1e-3, 1e-1)},
        "momentum": {"lr": (1e-3, 1e-1), "momentum": (0.8, 0.95)},
        "adam": {"lr": (1e-4, 1e-2), "betas": (0.9, 0.99), "weight": 2.0},
    },
    "reinit_head": 0.5,
    "batch_size": (6, 8),
    "inner_steps": (2, 3),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- step weighting


def test_trajectory_weights_values():
    counts = [3, 3, 2, 4]
    uniform = trajectory_weights(counts)
    assert uniform == [c / 12 for c in counts]  # exactly the engines' former n_k / N
    late = trajectory_weights(counts, "late")
    raw = [3 * 1, 3 * 2, 2 * 3, 4 * 4]
    assert late == pytest.approx([r / sum(raw) for r in raw], rel=1e-15)
    expo = trajectory_weights(counts, "exponential", 0.5)
    raw = [c * math.exp(0.5 * (k + 1 - 4)) for k, c in enumerate(counts)]
    assert expo == pytest.approx([r / sum(raw) for r in raw], rel=1e-15)
    assert sum(expo) == pytest.approx(1.0, rel=1e-15)
    assert trajectory_weights(counts, "exponential", 0.0) == pytest.approx(uniform, rel=1e-15)
    assert expo[-1] > expo[0] * 2  # late steps count more
    with pytest.raises(ValueError, match="expected one of"):
        trajectory_weights(counts, "early")
    with pytest.raises(ValueError, match=">= 0"):
        trajectory_weights(counts, "exponential", -1.0)


def test_step_weighting_config_validation():
    with pytest.raises(ValueError, match="step_weighting"):
        ProtectConfig(step_weighting="first")
    with pytest.raises(ValueError, match="step_weighting_rate"):
        ProtectConfig(step_weighting="exponential", step_weighting_rate=math.inf)
    config = ProtectConfig(step_weighting="late")
    assert ProtectConfig.from_dict(config.to_dict()) == config
    assert "step_weighting" not in ProtectConfig().to_dict()  # default dicts stay as they were


def _simulate(engine, weighting, order=1, truncate=None, adversary=("momentum", 0.1)):
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    config = ProtectConfig(
        dtype="float64", order=order, truncate=truncate, step_weighting=weighting[0],
        step_weighting_rate=weighting[1],
    )  # fmt: skip
    out = simulate(
        model, batches, adapt_masks, eval_masks, config, adversary=adversary, engine=engine
    )
    names = [n for n, _ in model.named_parameters()]
    return out, flat_grad(out.meta_grad, names)


@pytest.mark.parametrize("weighting", [("late", 0.0), ("exponential", 1.5)], ids=lambda w: w[0])
@pytest.mark.parametrize("order,truncate", [(1, None), (2, None), (2, 1)])
def test_weighted_engines_agree_and_differ_from_uniform(weighting, order, truncate):
    fast, fast_grad = _simulate("fast", weighting, order, truncate)
    ref, ref_grad = _simulate("reference", weighting, order, truncate)
    assert rel_err(fast_grad, ref_grad) <= META_GRAD_RTOL
    assert abs(float(fast.loss - ref.loss)) <= 1e-12 * abs(float(ref.loss))
    _, uniform_grad = _simulate("fast", ("uniform", 0.0), order, truncate)
    assert rel_err(fast_grad, uniform_grad) > 1e-3  # the weighting reaches the meta-gradient


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_weighted_loss_is_the_weighted_sum_of_step_losses(engine):
    """Each step's loss from prefix runs (the trajectory up to k is the same in a K=k run): with
    equal evaluation counts, uniform L_k = mean(l_1..l_k), so l_k = k L_k - (k - 1) L_{k-1}."""
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    adversary = ("adam", 0.01)
    step_losses, previous = [], 0.0
    for k in range(1, len(batches) + 1):
        out = simulate(
            model, batches[:k], adapt_masks[:k], eval_masks[:k], ProtectConfig(dtype="float64"),
            adversary=adversary, engine=engine,
        )  # fmt: skip
        step_losses.append(k * float(out.loss) - (k - 1) * previous)
        previous = float(out.loss)
    counts = [int(m.sum()) for m in eval_masks]
    assert len(set(counts)) == 1
    for weighting in (("late", 0.0), ("exponential", 0.7)):
        config = ProtectConfig(
            dtype="float64", step_weighting=weighting[0], step_weighting_rate=weighting[1]
        )
        out = simulate(
            model, batches, adapt_masks, eval_masks, config, adversary=adversary, engine=engine
        )
        weights = trajectory_weights(counts, *weighting)
        expected = sum(w * loss for w, loss in zip(weights, step_losses))
        assert float(out.loss) == pytest.approx(expected, rel=1e-12)


def test_vmap_path_takes_the_weighting():
    torch.manual_seed(0)
    model = TanhMLP().double()
    flat = FlatParams.from_module(model)
    fmodel = FunctionalModel(model, flat.layout)
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(7, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (7,), generator=g),
        )
        for _ in range(3)
    ]
    adapt = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 6])]
    evaluate = [torch.tensor([4, 5, 6]), torch.tensor([1, 3, 5]), torch.tensor([0, 2, 4])]
    adversaries = [resolve_adversary(("sgd", 0.1)), resolve_adversary(("sgd", 0.05))]
    losses = dict(suppression_loss=get_loss("klu"), adapt_loss=get_loss("ce"))
    weighting = ("exponential", 1.0)
    batched = simulate_vmapped(
        fmodel, flat, batches, adapt, evaluate, **losses, adversaries=adversaries, order=1,
        head_values=None, step_weighting=weighting,
    )  # fmt: skip
    for adversary, (loss, _, grad) in zip(adversaries, batched):
        one = simulate_flat(
            fmodel, flat, batches, adapt, evaluate, **losses, adversary=adversary, order=1,
            truncate=None, head_values=None, step_weighting=weighting,
        )  # fmt: skip
        assert rel_err(grad, one.meta_grad) <= 1e-12
        assert float(loss) == pytest.approx(float(one.loss), rel=1e-12)


# ---------------------------------------------------------------------- attacker distribution


def test_distribution_validation_messages():
    def refuses(spec, match, error=ValueError):
        with pytest.raises(error, match=match):
            ProtectConfig(adversaries=spec)

    refuses({"families": {}}, "non-empty")
    refuses({"families": {"lion": {"lr": 1e-3}}}, "unknown optimizer")
    refuses({"families": {"sgd": {}}}, "'lr'")
    refuses({"families": {"sgd": {"lr": (1e-1, 1e-3)}}}, "low <= high")
    refuses({"families": {"sgd": {"lr": (0.0, 1e-3)}}}, "lr")
    refuses({"families": {"momentum": {"lr": 1e-2, "momentum": (0.5, 1.5)}}}, "momentum")
    refuses({"families": {"sgd": {"lr": 1e-2, "betas": (0.9, 0.99)}}}, "unknown keys")
    refuses({"families": {"sgd": {"lr": 1e-2, "weight": 0}}}, "weight")
    refuses({"families": {"sgd": {"lr": 1e-2}}, "reinit_head": 2.0}, "probability")
    refuses({"families": {"sgd": {"lr": 1e-2}}, "batch_size": (1, 8)}, "batch_size")
    refuses({"families": {"sgd": {"lr": 1e-2}}, "inner_steps": []}, "inner_steps")
    refuses({"families": {"sgd": {"lr": 1e-2}}, "horizon": 3}, "unknown keys")
    with pytest.raises(ValueError, match="adversary_sampling"):
        ProtectConfig(adversaries=DISTRIBUTION, adversary_sampling="all")
    with pytest.raises(ValueError, match="no classification head"):
        ProtectConfig(mode="generation", loss="mse_ascent", adversaries=DISTRIBUTION)


def test_distribution_round_trips_through_the_config_dict():
    config = ProtectConfig(adversaries=DISTRIBUTION)
    assert isinstance(config.adversary_distribution, AdversaryDistribution)
    again = ProtectConfig.from_dict(config.to_dict())
    assert again == config
    assert ProtectConfig().adversary_distribution is None


def test_draws_follow_the_distribution():
    distribution = AdversaryDistribution.from_spec(DISTRIBUTION)
    g = torch.Generator().manual_seed(0)
    plans = [
        distribution.draw(g, batch_size=8, adapt_size=5, inner_steps=50, reinit_head=False)
        for _ in range(4000)
    ]
    names = [p.adversary.name for p in plans]
    assert names.count("adam") / len(names) == pytest.approx(0.5, abs=0.03)  # weight 2 of 4
    assert names.count("sgd") / len(names) == pytest.approx(0.25, abs=0.03)
    sgd = [math.log10(p.adversary.lr) for p in plans if p.adversary.name == "sgd"]
    assert -3 <= min(sgd) and max(sgd) <= -1
    assert sum(s < -2 for s in sgd) / len(sgd) == pytest.approx(0.5, abs=0.05)  # log-uniform
    momenta = [p.adversary.hp["momentum"] for p in plans if p.adversary.name == "momentum"]
    assert 0.8 <= min(momenta) < 0.82 and 0.93 < max(momenta) <= 0.95
    assert all(p.adversary.hp["betas"] == (0.9, 0.99) for p in plans if p.adversary.name == "adam")
    assert sum(p.reinit_head for p in plans) / len(plans) == pytest.approx(0.5, abs=0.03)
    assert {p.batch_size for p in plans} == {6, 8} and {p.inner_steps for p in plans} == {2, 3}
    # a drawn batch size keeps the run's adapt / evaluate proportion
    assert {(p.batch_size, p.adapt_size) for p in plans} == {(6, 4), (8, 5)}
    # the same seed gives the same attackers
    g2 = torch.Generator().manual_seed(0)
    again = distribution.draw(g2, batch_size=8, adapt_size=5, inner_steps=50, reinit_head=False)
    assert again == plans[0]


def test_a_draw_shapes_the_simulation():
    distribution = AdversaryDistribution.from_spec(
        {"families": {"sgd": {"lr": 0.1}}, "reinit_head": 1.0, "batch_size": 6, "inner_steps": 4}
    )
    model = tiny_cnn()
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    g = torch.Generator().manual_seed(0)
    draw = draw_simulation(
        images=images, labels=labels, sampler=EpochSampler(20, g), generator=g, inner_steps=2,
        batch_size=8, adapt_size=5, head=("fc", model.fc), adversaries=(), sample_one=True,
        distribution=distribution, reinit_head=False,
    )  # fmt: skip
    assert len(draw.batches) == 4 and all(x.shape[0] == 6 for x, _ in draw.batches)
    assert all(int(m.sum()) == 4 for m in draw.adapt_masks)  # round(6 * 5 / 8)
    assert set(draw.head_values) == {"fc.weight", "fc.bias"}
    assert draw.plan["adversary"]["name"] == "sgd" and draw.plan["reinit_head"] is True
    never = AdversaryDistribution.from_spec({"families": {"sgd": {"lr": 0.1}}, "reinit_head": 0})
    draw = draw_simulation(
        images=images, labels=labels, sampler=EpochSampler(20, g), generator=g, inner_steps=2,
        batch_size=8, adapt_size=5, head=("fc", model.fc), adversaries=(), sample_one=True,
        distribution=never, reinit_head=True,
    )  # fmt: skip
    assert draw.head_values is None and len(draw.batches) == 2


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_distribution_runs_are_recorded_and_resume_bit_identically(tmp_path, engine):
    torch.manual_seed(0)
    original, restricted = domains()
    config = tiny_config(
        outer_steps=4, engine=engine, adversaries=DISTRIBUTION, simulations=2,
        step_weighting="exponential", step_weighting_rate=0.5, loss="klu",
    )  # fmt: skip
    straight = protect(tiny_cnn(), original, restricted, config, progress=False)
    for record in straight.history:
        assert len(record["draws"]) == 2  # one draw per simulation
        assert [d["adversary"]["name"] for d in record["draws"]] == [
            a.split("(")[0] for a in record["adversaries"]
        ]
    drawn = [d for record in straight.history for d in record["draws"]]
    assert len({d["adversary"]["lr"] for d in drawn}) == len(drawn)  # fresh learning rates
    assert {d["reinit_head"] for d in drawn} == {True, False}  # klu runs re-draw by the draw
    halfway = ProtectConfig.from_dict({**config.to_dict(), "outer_steps": 2})
    protect(tiny_cnn(), original, restricted, halfway, checkpoint_dir=tmp_path, progress=False)
    resumed = protect(
        tiny_cnn(), original, restricted, config, checkpoint_dir=tmp_path, resume=True,
        progress=False,
    )  # fmt: skip
    assert_same_state(straight.model, resumed.model)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]


def test_fast_and_reference_protect_agree_under_a_distribution():
    original, restricted = domains()
    results = {
        engine: protect(
            tiny_cnn(),
            original,
            restricted,
            tiny_config(engine=engine, adversaries=DISTRIBUTION, step_weighting="late"),
            progress=False,
        )  # fmt: skip
        for engine in ("fast", "reference")
    }
    fast, ref = results["fast"].model.state_dict(), results["reference"].model.state_dict()
    for name in fast:
        assert float((fast[name] - ref[name]).abs().max()) <= 1e-10, name
    assert results["fast"].history[0]["draws"] == results["reference"].history[0]["draws"]


def test_presets():
    assert ProtectConfig.preset("official") == ProtectConfig()
    robust = ProtectConfig.preset("robust", outer_steps=7)
    assert robust.outer_steps == 7 and robust.adversary_distribution is not None
    with pytest.raises(ValueError, match="unknown preset"):
        ProtectConfig.preset("strongest")


# ------------------------------------------------------------------------ representation term


def test_heldout_probe_r2_reads_linear_information():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    noise = torch.randn(200, 30, generator=g, dtype=torch.float64)
    informative = noise * 0.1
    informative[:, :4] += torch.nn.functional.one_hot(labels, 4).double()
    assert float(heldout_probe_r2(informative, labels, 4)) > 0.8
    assert float(heldout_probe_r2(noise, labels, 4)) < 0.1  # nothing to read: about 0 or below
    scaled = float(heldout_probe_r2(informative * 1e3, labels, 4))
    assert scaled == pytest.approx(float(heldout_probe_r2(informative, labels, 4)), rel=1e-9)
    features = informative.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: heldout_probe_r2(f, labels[:40], 4), (features[:40].detach().requires_grad_(),)
    )
    with pytest.raises(ValueError, match="at least 4"):
        heldout_probe_r2(informative[:3], labels[:3], 4)


def test_representation_term_in_both_engines():
    original, restricted = domains(n_restricted=40)
    results = {}
    for engine in ("fast", "reference"):
        config = tiny_config(engine=engine, representation_weight=0.5, representation_samples=12)
        results[engine] = protect(tiny_cnn(), original, restricted, config, progress=False)
    fast, ref = results["fast"], results["reference"]
    r2 = [h["probe_r2"] for h in fast.history]
    assert r2 == pytest.approx([h["probe_r2"] for h in ref.history], rel=1e-10)
    for name, value in fast.model.state_dict().items():
        assert float((value - ref.model.state_dict()[name]).abs().max()) <= 1e-10, name
    off = protect(tiny_cnn(), original, restricted, tiny_config(), progress=False)
    assert "probe_r2" not in off.history[0]
    moved = max(
        float((v - off.model.state_dict()[k]).abs().max())
        for k, v in fast.model.state_dict().items()
    )
    assert moved > 1e-6  # the term changes the protected weights
    with pytest.raises(ValueError, match="representation_weight"):
        ProtectConfig(mode="generation", loss="mse_ascent", representation_weight=1.0)
