"""torch.compile traces models that call the fused ops without graph breaks (ops/_library.py).

A small CNN with every fused module (FusedBatchNorm2d, FusedBatchNormReLUMaxPool2d,
FusedReLUMaxPool2d) and a fused loss, compiled with ``fullgraph=True`` (any graph break is an
error) and the ``aot_eager`` backend (AOTAutograd without code generation: the test stays fast),
gives the eager model's loss, parameter gradients and running statistics on every backend that
runs here; with a fused backend the kernels themselves are the graph's nodes (the custom ops
``sophon_fast::...``), not a decomposition. The backend is fixed when a model is compiled, so
each case resets dynamo first.
"""

import copy

import pytest
import torch
from _backends import backend_params
from _tolerances import elementwise
from torch import nn

from sophon_fast import _backend
from sophon_fast.nn import (
    FusedBatchNorm2d,
    FusedBatchNormReLUMaxPool2d,
    FusedReLUMaxPool2d,
    convert_batchnorm,
    fuse_bn_relu_pool,
    fuse_relu_pool,
)
from sophon_fast.ops import losses as fused_losses
from sophon_fast.ops.flat_sgd_step import flat_sgd_step

# Fused backends here: every (N, C, H, W) op has a kernel on cpu, cuda and triton, except
# relu_maxpool2d (cpu only: the others run its reference composition).
FUSED_OPS = {
    "cpu": {"batch_norm", "bn_relu_pool", "relu_maxpool2d", "classification_loss"},
    "cuda": {"batch_norm", "bn_relu_pool", "classification_loss"},
    "triton": {"batch_norm", "bn_relu_pool", "classification_loss"},
    "reference": set(),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(device) -> nn.Module:
    """conv -> BN -> ReLU -> pool (fused as one), conv -> BN (fused alone) -> ReLU, conv -> ReLU
    -> pool (fused pair), linear; float64 so compiled and eager compare at the float64 row."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )
    fuse_relu_pool(fuse_bn_relu_pool(convert_batchnorm(model)))
    kinds = {type(m) for m in model}
    assert {FusedBatchNorm2d, FusedBatchNormReLUMaxPool2d, FusedReLUMaxPool2d} <= kinds, kinds
    return model.to(device=device, dtype=torch.float64)


def _loss(model, x, labels):
    return fused_losses.cross_entropy(model(x), labels)


def _step(loss_fn, model, x, labels):
    """Loss, parameter gradients and running statistics after one forward + backward (the
    backward outside the compiled function: AOTAutograd compiled it with the forward)."""
    loss = loss_fn(model, x, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [loss.detach(), *grads, *(b.clone() for b in model.buffers())]


def _fused_nodes(graph_module: torch.fx.GraphModule) -> set[str]:
    """Names of the sophon_fast custom ops called anywhere in a dynamo graph (subgraphs too)."""
    names = set()
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = getattr(node.target, "name", None)
            if node.op == "call_function" and callable(target):
                qualified = target()
                if qualified.startswith("sophon_fast::"):
                    names.add(qualified.removeprefix("sophon_fast::").split(".")[0])
    return names


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_cnn_with_fused_ops_compiles_without_graph_breaks(backend, device):
    eager_model = _model(device)
    compiled_model = copy.deepcopy(eager_model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 3, 1, 4], device=device)
    graphs = []

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    with _backend.use_backend(backend):
        compiled = torch.compile(_loss, fullgraph=True, backend=recording_aot_eager)
        for _ in range(2):  # the second call reuses the graph (running statistics moved on)
            got = _step(compiled, compiled_model, x, labels)
            want = _step(_loss, eager_model, x, labels)
            assert len(got) == len(want)
            for k, (g, w) in enumerate(zip(got, want)):
                torch.testing.assert_close(g, w, **elementwise(torch.float64), msg=f"output {k}")
    assert len(graphs) == 1
    assert _fused_nodes(graphs[0]) >= FUSED_OPS[backend]


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("kind", [*fused_losses.KINDS, *fused_losses.GENERATION_KINDS])
def test_every_fused_loss_compiles(backend, device, kind):
    torch.manual_seed(1)
    if kind in fused_losses.GENERATION_KINDS:
        inputs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device) for _ in range(2)]
    else:
        inputs = [
            torch.randn(6, 5, dtype=torch.float64, device=device),
            torch.randint(0, 5, (6,), device=device),
        ]
    fn = {
        "ce": fused_losses.cross_entropy,
        "ice": fused_losses.inverse_cross_entropy,
        "ice_paper": fused_losses.inverse_cross_entropy_paper,
        "klu": fused_losses.kl_uniform,
        "mse_ascent": fused_losses.mse_ascent,
        "dos": fused_losses.dos,
    }[kind]

    def value_and_grad(loss_fn):
        first = inputs[0].detach().requires_grad_(True)
        loss = 3.0 * loss_fn(first, inputs[1])  # grad_out = 3: the backward's scaled path
        (grad,) = torch.autograd.grad(loss, first)
        return loss.detach(), grad

    with _backend.use_backend(backend):
        got = value_and_grad(torch.compile(fn, fullgraph=True, backend="aot_eager"))
        want = value_and_grad(fn)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **elementwise(torch.float64))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
def test_flat_sgd_step_compiles(backend, device, weight_decay):
    """Forward and backward; with weight_decay 0 the backward returns its incoming gradient
    itself, which a custom op may not alias: the compiled path copies it."""
    params = torch.linspace(-1, 1, 11, dtype=torch.float64, device=device)
    grad = torch.linspace(2, -1, 11, dtype=torch.float64, device=device)

    def value_and_grads(step):
        p, g = params.clone().requires_grad_(True), grad.clone().requires_grad_(True)
        out = step(p, g)
        return (out.detach(), *torch.autograd.grad((out**3).sum(), (p, g)))

    def step(p, g):
        return flat_sgd_step(p, g, 0.1, weight_decay)

    with _backend.use_backend(backend):
        got = value_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
        want = value_and_grads(step)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **elementwise(torch.float64))
