"""The fast engine's speed options: the optimised default path (channels_last and fused modules in
order 1, fused BatchNorm and ReLU + max-pool in order 2) gives the reference meta-gradient in
float64; options are validated; CUDA-only options refuse the CPU; several adversaries in one vmap
pass equal the loop."""

import warnings

import pytest
import torch
from test_engine import restricted_draw, tiny_cnn

from sophon_fast.api import ProtectConfig
from sophon_fast.engine.inner import FastEngine, to_channels_last
from sophon_fast.engine.optimizers import resolve_adversary
from sophon_fast.engine.options import (
    FastOptions,
    bn_relu_pool_available,
    describe_defaults,
    resolve_options,
)
from sophon_fast.losses import get_loss
from sophon_fast.models import xavier_head_values
from sophon_fast.nn import FusedBatchNorm2d, FusedReLUMaxPool2d
from sophon_fast.reference.sophon import simulate_reference

META_GRAD_RTOL = 1e-13  # float64, as the engine tests (largest difference measured: 2.2e-15)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _engine(model, order, options=None):
    return FastEngine(
        model,
        meta_lr=1e-3,
        ntr_lr=1e-3,
        suppression_loss=get_loss("ice"),
        adapt_loss=get_loss("ce"),
        ntr_loss=get_loss("ce"),
        order=order,
        truncate=None,
        restore_bn=True,
        options=options,
    )


def _flat_reference(model, batches, adapt, evaluate, head_values, adversary, order):
    loss, accuracy, grads = simulate_reference(
        model, batches, adapt, evaluate,
        suppression_loss=get_loss("ice"), adapt_loss=get_loss("ce"),
        adversary=adversary, order=order, truncate=None, head_values=head_values,
    )  # fmt: skip
    flat = torch.cat([grads[name].reshape(-1) for name, _ in model.named_parameters()])
    return loss, accuracy, flat


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("adversary", [("sgd", 0.1), ("adam", 0.01)], ids=["sgd", "adam"])
def test_default_optimised_path_matches_the_reference(order, adversary):
    model = tiny_cnn()
    batches, adapt, evaluate, generator = restricted_draw()
    weight, bias = xavier_head_values(model.fc, generator=generator)
    head_values = {"fc.weight": weight, "fc.bias": bias}
    adversary = resolve_adversary(adversary)
    engine = _engine(model, order)
    resolved = engine.resolved
    # The defaults this test is about: NHWC (+ fused BN+ReLU+pool when installed) in order 1,
    # the fused BatchNorm double backward in order 2.
    assert resolved["channels_last"] is (order == 1)
    assert resolved["fused_batchnorm"] is (order == 2)
    assert resolved["fused_bn_relu_pool"] is (order == 1 and bn_relu_pool_available())
    forward_module = engine.fmodel.module
    if order == 2:
        assert forward_module is not model
        assert any(isinstance(m, FusedBatchNorm2d) for m in forward_module.modules())
        assert any(isinstance(m, FusedReLUMaxPool2d) for m in forward_module.modules())
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())  # user's untouched
    stats_before = engine.flat.stats.clone()
    loss, accuracy, grad = engine.simulate(batches, adapt, evaluate, head_values, adversary)
    ref_loss, ref_accuracy, ref_grad = _flat_reference(
        model, batches, adapt, evaluate, head_values, adversary, order
    )
    torch.testing.assert_close(grad, ref_grad, rtol=META_GRAD_RTOL, atol=1e-13)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(accuracy, ref_accuracy)
    assert torch.equal(engine.flat.stats, stats_before)  # restore_bn: statistics untouched
    assert grad.abs().max() > 0


def test_plain_and_optimised_paths_agree_on_ntr_steps():
    """NTR runs NHWC in order 1 too: same loss, same updated weights and statistics."""
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = _engine(tiny_cnn(), 1, {"channels_last": False, "fused_bn_relu_pool": False})
    fast = _engine(tiny_cnn(), 1)
    torch.testing.assert_close(fast.ntr_step(x, y), plain.ntr_step(x, y), rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.flat.params, plain.flat.params, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fast.flat.stats, plain.flat.stats, rtol=1e-12, atol=1e-15)


def test_to_channels_last_gives_nhwc_strides_even_for_one_channel():
    x = torch.randn(3, 1, 4, 5)
    out = to_channels_last(x)
    assert out.stride() == (20, 1, 5, 1)
    assert torch.equal(out, x)
    flat = torch.randn(3, 7)
    assert to_channels_last(flat) is flat


def test_options_validation():
    assert resolve_options(None) == FastOptions()
    assert resolve_options({"channels_last": True}).channels_last is True
    with pytest.raises(ValueError, match="unknown options"):
        resolve_options({"channel_last": True})
    with pytest.raises(TypeError, match="True, False or None"):
        resolve_options({"fused_batchnorm": "yes"})
    with pytest.raises(ValueError, match="cuda_graphs"):
        resolve_options({"cuda_graphs": "always"})
    with pytest.raises(ValueError, match="order=2"):
        resolve_options({"cuda_graphs": "inner"}, order=2)
    with pytest.raises(ValueError, match="autocast"):
        resolve_options({"autocast": "fp8"})
    with pytest.raises(TypeError, match="dict, FastOptions or None"):
        resolve_options(["channels_last"])
    if bn_relu_pool_available():
        with pytest.raises(ValueError, match="once differentiable"):
            resolve_options({"fused_bn_relu_pool": True}, order=2)
    with pytest.raises(ValueError, match="only the fast engine"):
        ProtectConfig(engine="reference", engine_options={"channels_last": True})
    config = ProtectConfig(engine_options={"channels_last": False})
    assert config.engine_options["channels_last"] is False
    assert ProtectConfig.from_dict(config.to_dict()).engine_options == config.engine_options
    assert "engine_options" not in ProtectConfig().to_dict()


@pytest.mark.parametrize("order", [1, 2])
def test_auto_defaults_are_per_device(order):
    """auto was tuned on the CPU; on CUDA (where nothing is measured yet, and the BatchNorm kernels
    copy channels_last inputs to NCHW and back) it switches on none of the speed options."""
    speed = ("channels_last", "fused_batchnorm", "fused_bn_relu_pool", "fused_relu_pool")
    cpu = FastOptions().resolved(order, torch.device("cpu"))
    assert cpu["channels_last"] is (order == 1)
    assert cpu["fused_batchnorm"] is (order == 2)
    assert cpu["fused_relu_pool"] is (order == 2)
    for device in (torch.device("cuda"), torch.device("cuda", 1), "cuda"):
        gpu = FastOptions().resolved(order, device)
        assert {name: gpu[name] for name in speed} == dict.fromkeys(speed, False), device
        assert gpu["vmap_adversaries"] is False
        assert gpu["flush_denormal"] is False
    assert describe_defaults(order, torch.device("cuda")) == "none"
    # An explicit choice is kept on every device.
    forced = FastOptions(channels_last=True, fused_batchnorm=True, vmap_adversaries=True)
    gpu = forced.resolved(order, torch.device("cuda"))
    assert gpu["channels_last"] is True and gpu["fused_batchnorm"] is True
    assert gpu["vmap_adversaries"] is True


@pytest.mark.parametrize(
    "options", [{"cuda_graphs": "inner"}, {"cuda_graphs": "simulation"}, {"autocast": "bf16"}]
)
def test_cuda_only_options_refuse_the_cpu(options):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _engine(tiny_cnn(), 1, options)


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: replay() runs the captured body."""

    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


@pytest.mark.parametrize("adversary", [("sgd", 0.1), ("adam", 0.01)], ids=["sgd", "adam"])
@pytest.mark.parametrize("mode", ["inner", "simulation"])
def test_graph_static_buffer_logic_matches_the_eager_simulation(monkeypatch, mode, adversary):
    """The CUDA-graph paths' static buffers, resets and copies, run eagerly on the CPU (the
    capture itself needs a GPU): two simulations in a row equal the eager engine's."""
    from sophon_fast.engine import graphs

    monkeypatch.setattr(
        graphs, "_capture", lambda body, warmup=2, pool=None: (body(), _EagerGraph(body))[1]
    )
    order = 1 if mode == "inner" else 2
    adversary = resolve_adversary(adversary)
    eager, graphed = _engine(tiny_cnn(), order), _engine(tiny_cnn(), order)
    graphed.resolved = dict(graphed.resolved, cuda_graphs=mode)  # past the CUDA-only check
    for seed in (1, 2):
        batches, adapt, evaluate, generator = restricted_draw(seed=seed)
        weight, bias = xavier_head_values(eager.model.fc, generator=generator)
        head_values = {"fc.weight": weight, "fc.bias": bias}
        want = eager.simulate(batches, adapt, evaluate, head_values, adversary)
        got = graphed.simulate(batches, adapt, evaluate, head_values, adversary)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(graphed.flat.stats, eager.flat.stats, rtol=0, atol=0)
    assert len(graphed._graphs) == 1 and next(iter(graphed._graphs.values())) is not None


class _Captured:
    """A stand-in graph that records the pool it was captured into and its release."""

    def __init__(self, name, pool):
        self.name, self.pool, self.released = name, pool, False

    def release(self):
        self.released = True


def test_graph_cache_shares_one_pool_and_frees_stale_graphs():
    """The engine's graphs share one capture pool; a new shape frees the graphs of other shapes,
    at most max_graphs stay (least recently used freed first), clear() frees the rest. (The real
    capture needs a GPU; its pool argument is what this checks.)"""
    from sophon_fast.engine import graphs

    cache = graphs.GraphCache(max_graphs=2)
    cache._pool = pool = object()  # what torch.cuda.graph_pool_handle() gives on a GPU

    def build(name):
        return lambda: _Captured(name, graphs._pool(None))

    a = cache.capture("sgd", build("sgd"), "inner step", shape=(5, 64))
    b = cache.capture("adam", build("adam"), "inner step", shape=(5, 64))
    assert a.pool is pool and b.pool is pool  # one pool for the engine, not one per graph
    assert graphs._pool(None) is None  # only during a capture
    assert cache["sgd"] is a  # sgd is now the most recently used
    c = cache.capture("rmsprop", build("rmsprop"), "inner step", shape=(5, 64))
    assert b.released and not a.released and not c.released  # least recently used went first
    assert sorted(cache.keys()) == ["rmsprop", "sgd"] and "adam" not in cache
    d = cache.capture("sgd-32", build("sgd-32"), "inner step", shape=(5, 32))
    assert a.released and c.released and list(cache.keys()) == ["sgd-32"]
    with pytest.warns(UserWarning, match="capture of the inner step failed"):
        failed = cache.capture("bad", lambda: 1 / 0, "inner step", shape=(5, 32))
    assert failed is None and cache["bad"] is None and len(cache) == 2
    cache.clear()
    assert d.released and len(cache) == 0
    with pytest.raises(ValueError, match="max_graphs"):
        graphs.GraphCache(max_graphs=0)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(
    "adversaries",
    [
        [("sgd", 0.1), ("sgd", 0.3), ("sgd", 0.05)],
        [("adam", 0.01), ("adam", 0.03)],
        [
            ("adagrad", 1e-2, {"initial_accumulator_value": 0.1}),
            ("adagrad", 3e-2, {"initial_accumulator_value": 0.1}),
        ],
        [("adadelta", 1.0), ("adadelta", 0.5)],
    ],
    ids=["sgd", "adam", "adagrad", "adadelta"],
)
def test_vmapped_adversaries_equal_the_loop(order, adversaries):
    from test_engine import TanhMLP

    from sophon_fast.engine import vmap as vmap_module

    torch.manual_seed(0)
    model = TanhMLP().double()
    batches, adapt, evaluate, generator = restricted_draw(image_shape=(4,))
    weight, bias = xavier_head_values(model.fc, generator=generator)
    head_values = {"fc.weight": weight, "fc.bias": bias}
    adversaries = [resolve_adversary(a) for a in adversaries]
    engine = _engine(model, order, {"vmap_adversaries": True})
    called = []
    original = vmap_module.simulate_vmapped
    vmap_module.simulate_vmapped = lambda *a, **k: called.append(1) or original(*a, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the loop warns: fail on it
            batched = engine.simulate_many(batches, adapt, evaluate, head_values, adversaries)
    finally:
        vmap_module.simulate_vmapped = original
    assert called, "the vmap path did not run"
    loop = [engine.simulate(batches, adapt, evaluate, head_values, a) for a in adversaries]
    for (loss, accuracy, grad), (want_loss, want_accuracy, want_grad) in zip(batched, loop):
        torch.testing.assert_close(grad, want_grad, rtol=META_GRAD_RTOL, atol=1e-13)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(accuracy, want_accuracy)
    assert not torch.allclose(batched[0][2], batched[1][2])  # the learning rates were batched


def test_vmap_falls_back_to_the_loop_for_batchnorm_models():
    from sophon_fast.engine.vmap import why_not_vmap

    engine = _engine(tiny_cnn(), 1)
    adversaries = [resolve_adversary(("sgd", 0.1)), resolve_adversary(("sgd", 0.2))]
    assert "running statistics" in why_not_vmap(engine.flat, adversaries, 1, None)
    batches, adapt, evaluate, _ = restricted_draw()
    results = engine.simulate_many(batches, adapt, evaluate, None, adversaries)
    want = engine.simulate(batches, adapt, evaluate, None, adversaries[1])
    torch.testing.assert_close(results[1][2], want[2], rtol=0, atol=0)
