"""Engine internals and the low-level simulate() call: flat buffers, functional BatchNorm, inner
optimizers against torch.optim, fast vs reference meta-gradients, finite differences."""

import copy

import pytest
import torch
from torch import nn

from sophon_fast.api import ProtectConfig, simulate
from sophon_fast.engine.flat import FlatLayout, FlatParams
from sophon_fast.engine.functional import FunctionalModel
from sophon_fast.engine.optimizers import (
    OPTIMIZER_DEFAULTS,
    init_state,
    inner_step,
    inner_step_,
    resolve_adversary,
    safe_sqrt,
)
from sophon_fast.models import SmallCNN, xavier_head_values

INNER_STEPS = 3
BATCH = 8
ADAPT = 5
META_GRAD_RTOL = 1e-13  # fast vs reference, float64: 2.2e-15 measured (max of 109), 45x margin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with 2 OpenMP threads on shared cores, libgomp's spin-wait makes each op
    ~100x slower (1.3 s vs 9 ms for one simulation here); one thread avoids it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ADVERSARIES = [
    ("sgd", 0.1),
    ("momentum", 0.1),
    ("adam", 0.01),
    ("nesterov", 0.1, {"weight_decay": 0.01}),
    ("adamw", 0.01),
    ("rmsprop", 0.01),
    ("adagrad", 1e-2),
    ("adadelta", 1.0),
]


def tiny_cnn(seed=0, classes=3):
    torch.manual_seed(seed)
    return SmallCNN(num_classes=classes, in_channels=1, image_size=8, widths=(3, 4)).double()


class TanhMLP(nn.Module):
    """Smooth tiny MLP (tanh: non-zero curvature everywhere) for finite differences."""

    head_name = "fc"

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.hidden(x)))


def restricted_draw(image_shape=(1, 8, 8), classes=3, seed=1, steps=INNER_STEPS):
    g = torch.Generator().manual_seed(seed)
    batches, adapt_masks, eval_masks = [], [], []
    for _ in range(steps):
        x = torch.randn(BATCH, *image_shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (BATCH,), generator=g)
        adapt = torch.zeros(BATCH, dtype=torch.bool)
        adapt[torch.randperm(BATCH, generator=g)[:ADAPT]] = True
        batches.append((x, y))
        adapt_masks.append(adapt)
        eval_masks.append(~adapt)
    return batches, adapt_masks, eval_masks, g


def flat_grad(meta_grad, names):
    return torch.cat([meta_grad[n].reshape(-1) for n in names])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- FlatParams / functional forward


def test_flat_params_layout_and_round_trip():
    model = tiny_cnn()
    flat = FlatParams.from_module(model)
    named = dict(model.named_parameters())
    assert flat.params.numel() == sum(p.numel() for p in named.values())
    assert flat.stats.numel() == sum(
        b.numel() for n, b in model.named_buffers() if b.is_floating_point()
    )
    assert flat.counters.dtype == torch.int64 and flat.counters.numel() == 2  # two BatchNorms
    for name, view in flat.layout.param_views(flat.params).items():
        assert torch.equal(view, named[name])
        assert view.data_ptr() - flat.params.data_ptr() == flat.layout.param_slice(name).start * 8
    other = tiny_cnn(seed=5)
    flat.write_to(other)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    backup = flat.clone()
    flat.params.data.add_(1.0)
    flat.stats.add_(1.0)
    flat.copy_from(backup)
    assert torch.equal(flat.params, backup.params) and torch.equal(flat.stats, backup.stats)


def test_flat_params_tied_weights_counted_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    layout = FlatLayout(model)
    assert layout.param_names == ["0.weight", "0.bias", "1.bias"]


def test_flat_params_rejects_mixed_dtypes():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3).double())
    with pytest.raises(ValueError, match="one floating dtype"):
        FlatLayout(model)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_functional_batchnorm_updates_flat_stats_like_torch(momentum):
    model = tiny_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum  # None: cumulative average through num_batches_tracked
    twin = copy.deepcopy(model).train()
    flat = FlatParams.from_module(model)
    fmodel = FunctionalModel(model, flat.layout)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
        out = fmodel(flat.params, flat.stats, flat.counters, x, train=True)
        assert torch.equal(out, twin(x))
    mirror = tiny_cnn(seed=9)
    flat.write_to(mirror)
    for name, value in twin.state_dict().items():
        assert torch.equal(mirror.state_dict()[name], value), name
    for name, value in model.state_dict().items():  # the module's own tensors are never touched
        assert torch.equal(before[name], value), name
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    assert torch.equal(
        fmodel(flat.params, flat.stats, flat.counters, x, train=False), twin.eval()(x)
    )


# ---------------------------------------------------------------- inner optimizers vs torch.optim


def _torch_optimizer(name, params, lr, hp):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=hp["weight_decay"])
    if name in ("momentum", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=hp["momentum"],
            dampening=hp.get("dampening", 0.0),
            nesterov=name == "nesterov",
            weight_decay=hp["weight_decay"],
        )
    if name == "adam":
        return torch.optim.Adam(
            params, lr=lr, betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, **hp)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, **hp)
    return torch.optim.RMSprop(
        params, lr=lr, alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["weight_decay"]
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DEFAULTS))
@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.05}], ids=["plain", "wd"])
def test_inner_optimizers_match_torch_optim(name, extra):
    if name == "momentum":
        extra = {**extra, "dampening": 0.3}
    adversary = resolve_adversary((name, 0.05, extra))
    g = torch.Generator().manual_seed(0)
    start = torch.randn(37, generator=g, dtype=torch.float64)
    grads = [torch.randn(37, generator=g, dtype=torch.float64) for _ in range(5)]
    grads[2][:4] = 0.0  # exact zeros: the zero-safe sqrt must not change values
    torch_param = start.clone().requires_grad_(True)
    optimizer = _torch_optimizer(name, [torch_param], adversary.lr, adversary.hp)
    params, state = start.clone(), init_state(name, start)
    for grad in grads:
        params, state = inner_step(adversary, params, grad, state)
        torch_param.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(params, torch_param.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DEFAULTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
def test_in_place_inner_step_gives_the_out_of_place_values(name, dtype, fused, monkeypatch):
    """First-order simulations update params and state in place: over 4 steps (the first-step
    special cases included) every value equals the out-of-place update's, bit for bit, through the
    fused in-place kernels and through the pure-torch kernels the registry falls back to without
    them."""
    from sophon_fast.engine import optimizers

    if not fused:
        monkeypatch.setattr(optimizers, "FUSED_KERNELS", {})
    adversary = resolve_adversary((name, 0.05, {"weight_decay": 0.01}))
    g = torch.Generator().manual_seed(2)
    start = torch.randn(41, generator=g, dtype=torch.float64).to(dtype)
    grads = [torch.randn(41, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    grads[1][:5] = 0.0
    out_params, out_state = start.clone(), init_state(name, start)
    params, state = start.clone(), init_state(name, start)
    buffers = {key: value.data_ptr() for key, value in state.items()}
    pointer = params.data_ptr()
    for grad in grads:
        out_params, out_state = inner_step(adversary, out_params, grad, out_state)
        inner_step_(adversary, params, grad, state)
        assert torch.equal(params, out_params)
        assert state.keys() == out_state.keys()
        for key in state:
            assert torch.equal(state[key], out_state[key]), key
    assert params.data_ptr() == pointer
    assert {key: value.data_ptr() for key, value in state.items()} == buffers


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DEFAULTS))
def test_inner_optimizers_are_twice_differentiable(name):
    adversary = resolve_adversary((name, 0.05, {"weight_decay": 0.01}))
    g = torch.Generator().manual_seed(1)
    params = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    warm = init_state(name, params.detach())
    _, warm = inner_step(
        adversary, params.detach(), torch.randn(6, generator=g, dtype=torch.float64), warm
    )

    def step(p, d):
        return inner_step(adversary, p, d, warm)[0]

    assert torch.autograd.gradcheck(step, (params, grad))
    assert torch.autograd.gradgradcheck(step, (params, grad))


@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_adagrad_starting_sum_and_lr_decay_match_torch_optim(in_place):
    # init_state makes a zero sum; the registry adds initial_accumulator_value on the first step.
    hp = {"lr_decay": 0.1, "initial_accumulator_value": 0.2, "weight_decay": 0.01}
    adversary = resolve_adversary(("adagrad", 0.05, hp))
    g = torch.Generator().manual_seed(6)
    start = torch.randn(37, generator=g, dtype=torch.float64)
    grads = [torch.randn(37, generator=g, dtype=torch.float64) for _ in range(4)]
    torch_param = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adagrad([torch_param], lr=0.05, **hp)
    params, state = start.clone(), init_state("adagrad", start)
    for grad in grads:
        if in_place:
            inner_step_(adversary, params, grad, state)
        else:
            params, state = inner_step(adversary, params, grad, state)
        torch_param.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(params, torch_param.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["sum"], optimizer.state[torch_param]["sum"])
    assert float(state["step"]) == len(grads)


def test_resolve_adversary_checks_the_adagrad_and_adadelta_ranges():
    with pytest.raises(ValueError, match=r"rho: expected a value in \[0, 1\)"):
        resolve_adversary(("adadelta", 1.0, {"rho": 1.0}))
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        resolve_adversary(("adagrad", 1e-2, {"initial_accumulator_value": -0.1}))
    with pytest.raises(ValueError, match="lr_decay"):
        resolve_adversary(("adagrad", 1e-2, {"lr_decay": -1.0}))
    assert resolve_adversary(("adadelta", 1.0)).hp == {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}
    assert resolve_adversary(("adagrad", 1e-2)).hp == {
        "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10,
    }  # fmt: skip


def test_safe_sqrt_has_zero_derivative_at_zero():
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    y = safe_sqrt(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert torch.equal(grad, torch.tensor([0.0, 0.25], dtype=torch.float64))


def test_resolve_adversary_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        resolve_adversary(("lion", 1e-4))
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        resolve_adversary(("sgd", 1e-4, {"momentum": 0.9}))
    with pytest.raises(ValueError, match="lr"):
        resolve_adversary(("sgd", 0.0))
    with pytest.raises(ValueError, match="beta"):
        resolve_adversary(("adam", 1e-4, {"betas": (0.9, 1.0)}))
    with pytest.raises(TypeError):
        resolve_adversary("sgd")
    assert resolve_adversary({"name": "adam", "lr": 1e-3, "eps": 1e-6}).hp["eps"] == 1e-6


# ---------------------------------------------------------------- fast vs reference (low-level call)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("adversary", ADVERSARIES, ids=lambda a: a[0])
def test_engines_give_the_same_meta_gradient(order, adversary):
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, g = restricted_draw()
    weight, bias = xavier_head_values(model.fc, generator=g)
    head_values = {"fc.weight": weight, "fc.bias": bias}
    config = ProtectConfig(order=order, dtype="float64")
    results = {
        engine: simulate(
            model,
            batches,
            adapt_masks,
            eval_masks,
            config,
            adversary=adversary,
            head_values=head_values,
            engine=engine,
        )
        for engine in ("fast", "reference")
    }
    names = [n for n, _ in model.named_parameters()]
    fast, ref = results["fast"], results["reference"]
    assert list(fast.meta_grad) == names and list(ref.meta_grad) == names
    assert (
        rel_err(flat_grad(fast.meta_grad, names), flat_grad(ref.meta_grad, names)) <= META_GRAD_RTOL
    )
    for name in names:  # per tensor too: no tensor may hide behind a large neighbour
        assert rel_err(fast.meta_grad[name], ref.meta_grad[name]) <= META_GRAD_RTOL, name
    assert abs(float(fast.loss - ref.loss)) <= 1e-12 * abs(float(ref.loss))
    assert float(fast.accuracy) == float(ref.accuracy)
    # the head, never read by the simulation, still gets meta-gradient (the official identity edge)
    assert float(fast.meta_grad["fc.weight"].abs().sum()) > 0


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_truncation_ends(engine):
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    names = [n for n, _ in model.named_parameters()]

    def run(**kwargs):
        cfg = ProtectConfig(dtype="float64", **kwargs)
        out = simulate(
            model, batches, adapt_masks, eval_masks, cfg, adversary=("momentum", 0.1), engine=engine
        )
        return flat_grad(out.meta_grad, names)

    first = run(order=1)
    full = run(order=2)
    assert rel_err(run(order=2, truncate=0), first) <= 1e-14
    assert rel_err(run(order=2, truncate=INNER_STEPS), full) <= 1e-14
    assert rel_err(run(order=2, truncate=50), full) <= 1e-14
    middle = run(order=2, truncate=1)
    assert rel_err(full, first) > 1e-6  # the orders genuinely differ, so the checks above can fail
    assert rel_err(middle, first) > 1e-8 and rel_err(middle, full) > 1e-8


def test_engines_agree_with_truncation():
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    names = [n for n, _ in model.named_parameters()]
    cfg = ProtectConfig(dtype="float64", order=2, truncate=2)
    grads = [
        flat_grad(
            simulate(
                model, batches, adapt_masks, eval_masks, cfg, adversary=("adam", 0.01), engine=e
            ).meta_grad,
            names,
        )
        for e in ("fast", "reference")
    ]
    assert rel_err(grads[0], grads[1]) <= META_GRAD_RTOL


@pytest.mark.parametrize("order", [1, 2])
def test_simulate_builds_the_fast_engine_as_protect_does(order, monkeypatch):
    """simulate() runs on the engine protect() builds: the config's engine options (auto ones
    included) reach the simulation, and the meta-gradient still equals the reference's."""
    from sophon_fast.engine.inner import FastEngine

    seen = []
    eager = FastEngine._simulate_eager

    def spy(self, *args, **kwargs):
        seen.append(dict(self.resolved))
        return eager(self, *args, **kwargs)

    monkeypatch.setattr(FastEngine, "_simulate_eager", spy)
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    names = [n for n, _ in model.named_parameters()]
    # the opposite of what "auto" picks on the CPU for this order (channels_last in order 1,
    # the fused ReLU + max-pool in order 2)
    options = {"channels_last": order == 2, "fused_relu_pool": order == 1}
    grads = {}
    for engine, engine_options in (("fast", None), ("fast", options), ("reference", None)):
        config = ProtectConfig(order=order, dtype="float64", engine_options=engine_options)
        out = simulate(
            model, batches, adapt_masks, eval_masks, config, adversary=("sgd", 0.1), engine=engine
        )
        grads[engine, engine_options is None] = flat_grad(out.meta_grad, names)
    assert len(seen) == 2  # the fast engine's two simulations
    for name, value in options.items():
        assert seen[0][name] is (not value) and seen[1][name] is value, name
    for key in (("fast", True), ("fast", False)):
        assert rel_err(grads[key], grads["reference", True]) <= META_GRAD_RTOL, key


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_simulate_leaves_the_model_untouched(engine):
    model = tiny_cnn()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, adapt_masks, eval_masks, g = restricted_draw()
    weight, bias = xavier_head_values(model.fc, generator=g)
    for order in (1, 2):
        simulate(
            model,
            batches,
            adapt_masks,
            eval_masks,
            ProtectConfig(order=order, dtype="float64"),
            adversary=("adam", 0.01),
            head_values={"fc.weight": weight, "fc.bias": bias},
            engine=engine,
        )
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name  # weights and BN stats, bit for bit
        assert not model.training
        assert all(p.grad is None for p in model.parameters())


def test_reference_simulation_drifts_and_restores_bn_stats():
    """The reference shares BN buffers with the model (as learn2learn): the restore is real work."""
    from sophon_fast.losses import get_loss
    from sophon_fast.reference.sophon import simulate_reference

    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    kwargs = dict(
        suppression_loss=get_loss("ice"),
        adapt_loss=get_loss("ce"),
        adversary=resolve_adversary(("sgd", 0.1)),
        order=1,
        truncate=None,
        head_values=None,
    )
    simulate_reference(model, batches, adapt_masks, eval_masks, restore_stats=False, **kwargs)
    drifted = model.state_dict()
    assert not torch.equal(drifted["features.1.running_mean"], before["features.1.running_mean"])
    assert int(drifted["features.1.num_batches_tracked"]) == 2 * INNER_STEPS
    model.load_state_dict(before)
    simulate_reference(model, batches, adapt_masks, eval_masks, restore_stats=True, **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_simulate_validates_inputs():
    model = tiny_cnn()
    batches, adapt_masks, eval_masks, _ = restricted_draw()
    with pytest.raises(ValueError, match="as many adapt and eval masks"):
        simulate(model, batches, adapt_masks[:-1], eval_masks)
    empty = [torch.zeros(BATCH, dtype=torch.bool)] + eval_masks[1:]
    with pytest.raises(ValueError, match="eval mask selects no sample"):
        simulate(model, batches, adapt_masks, empty)
    with pytest.raises(ValueError, match="bool adapt mask"):
        simulate(model, batches, [m.long() for m in adapt_masks], eval_masks)
    with pytest.raises(ValueError, match="head_values"):
        simulate(
            model, batches, adapt_masks, eval_masks, head_values={"fc.weight": torch.zeros(2, 2)}
        )
    with pytest.raises(ValueError, match="engine"):
        simulate(model, batches, adapt_masks, eval_masks, engine="fastest")


# ---------------------------------------------------------------- order 2 vs finite differences


def _loss_at(
    model, theta, names, shapes, batches, adapt_masks, eval_masks, config, adversary, head_values
):
    probe = copy.deepcopy(model)
    with torch.no_grad():
        offset = 0
        params = dict(probe.named_parameters())
        for name, shape in zip(names, shapes):
            n = shape.numel()
            params[name].copy_(theta[offset : offset + n].view(shape))
            offset += n
    return float(
        simulate(
            probe,
            batches,
            adapt_masks,
            eval_masks,
            config,
            adversary=adversary,
            head_values=head_values,
            engine="fast",
        ).loss
    )


@pytest.mark.parametrize(
    "adversary", [("sgd", 0.5), ("momentum", 0.3), ("adam", 0.05)], ids=lambda a: a[0]
)
def test_order2_meta_gradient_matches_finite_differences(adversary):
    torch.manual_seed(0)
    model = TanhMLP().double()
    batches, adapt_masks, eval_masks, _ = restricted_draw(image_shape=(4,), seed=4)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    config = ProtectConfig(order=2, loss="klu", dtype="float64")
    exact = flat_grad(
        simulate(model, batches, adapt_masks, eval_masks, config, adversary=adversary).meta_grad,
        names,
    )
    step = 1e-5
    numeric = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = step
        plus = _loss_at(
            model,
            theta + e,
            names,
            shapes,
            batches,
            adapt_masks,
            eval_masks,
            config,
            adversary,
            None,
        )
        minus = _loss_at(
            model,
            theta - e,
            names,
            shapes,
            batches,
            adapt_masks,
            eval_masks,
            config,
            adversary,
            None,
        )
        numeric[i] = (plus - minus) / (2 * step)
    # central differences: O(step^2) truncation + O(eps / step) rounding, both ~1e-10 here
    assert rel_err(exact, numeric) <= 1e-7
    first = simulate(
        model,
        batches,
        adapt_masks,
        eval_masks,
        ProtectConfig(order=1, loss="klu", dtype="float64"),
        adversary=adversary,
    ).meta_grad
    assert (
        rel_err(flat_grad(first, names), numeric) > 1e-3
    )  # order 1 is an approximation: the test can fail


def test_order2_head_reinit_semantics_against_finite_differences():
    """With the head re-drawn, the map theta -> L is constant in theta's head (finite differences
    are exactly 0 there), and theta's head receives dL/d(re-drawn head values) instead."""
    torch.manual_seed(0)
    model = TanhMLP().double()
    batches, adapt_masks, eval_masks, g = restricted_draw(image_shape=(4,), seed=4)
    weight, bias = xavier_head_values(model.fc, generator=g)
    head_values = {"fc.weight": weight, "fc.bias": bias}
    config = ProtectConfig(order=2, loss="ice", dtype="float64")
    adversary = ("adam", 0.05)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    exact = simulate(
        model,
        batches,
        adapt_masks,
        eval_masks,
        config,
        adversary=adversary,
        head_values=head_values,
    ).meta_grad
    step = 1e-5
    hidden = model.hidden.weight.numel() + model.hidden.bias.numel()
    numeric = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = step
        args = (names, shapes, batches, adapt_masks, eval_masks, config, adversary, head_values)
        numeric[i] = (_loss_at(model, theta + e, *args) - _loss_at(model, theta - e, *args)) / (
            2 * step
        )
    assert torch.equal(numeric[hidden:], torch.zeros_like(numeric[hidden:]))
    assert rel_err(flat_grad(exact, names[:2]), numeric[:hidden]) <= 1e-7
    # head: derivative with respect to the re-drawn values (perturb the values, not theta)
    probe = {k: v.clone() for k, v in head_values.items()}
    numeric_head = torch.zeros_like(weight.reshape(-1))
    for i in range(weight.numel()):
        for sign in (1, -1):
            probe["fc.weight"] = weight.clone().reshape(-1)
            probe["fc.weight"][i] += sign * step
            probe["fc.weight"] = probe["fc.weight"].view_as(weight)
            value = float(
                simulate(
                    model,
                    batches,
                    adapt_masks,
                    eval_masks,
                    config,
                    adversary=adversary,
                    head_values=probe,
                ).loss
            )
            numeric_head[i] += sign * value / (2 * step)
    assert rel_err(exact["fc.weight"].reshape(-1), numeric_head) <= 1e-7


# ---------------------------------------------------------------- shared draws


def test_epoch_sampler_gives_full_batches_across_epoch_ends():
    from sophon_fast.engine.sampling import EpochSampler

    sampler = EpochSampler(30, torch.Generator().manual_seed(0))
    epoch = [sampler.next(8) for _ in range(3)]  # 24 of 30: the 6-sample tail is skipped
    assert all(b.numel() == 8 for b in epoch)
    assert torch.cat(epoch).unique().numel() == 24
    wrapped = sampler.next(8)  # a new epoch: a full batch, never a short simulation
    assert wrapped.numel() == 8 and sampler.position == 8
    state = sampler.state_tensors("s")
    twin = EpochSampler(30, torch.Generator().manual_seed(5))
    twin.load_state_tensors(state, "s")
    assert torch.equal(twin.next(8), sampler.next(8))
    with pytest.raises(ValueError, match="covers 30 samples"):
        EpochSampler(31, torch.Generator()).load_state_tensors(state, "s")


def test_draw_split_is_a_random_complementary_split():
    from sophon_fast.engine.sampling import draw_split

    g = torch.Generator().manual_seed(0)
    splits = [draw_split(10, 7, g) for _ in range(5)]
    for adapt, evaluate in splits:
        assert adapt.dtype == torch.bool and int(adapt.sum()) == 7 and torch.equal(evaluate, ~adapt)
    assert len({tuple(a.tolist()) for a, _ in splits}) > 1
