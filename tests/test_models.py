"""Tests for the model zoo and the classifier-head helpers (sophon_fast.models)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from sophon_fast.models import (
    MLP,
    MODELS,
    ResNet18CIFAR,
    SmallCNN,
    VGGSmall,
    build_model,
    find_head,
    num_classes_of,
    reinit_head_,
    xavier_head_values,
)

# (registry name, kwargs, input shape). Odd class counts (7, 13) catch head-size mistakes.
CASES = [
    ("small_cnn", {}, (2, 1, 28, 28)),
    ("small_cnn", {"in_channels": 3, "image_size": 32, "num_classes": 7}, (2, 3, 32, 32)),
    ("small_cnn", {"image_size": 30, "widths": [5, 11]}, (2, 1, 30, 30)),
    ("resnet18_cifar", {}, (2, 3, 32, 32)),
    ("vgg_small", {}, (2, 3, 32, 32)),
    ("vgg_small", {"in_channels": 1, "image_size": 28, "num_classes": 13}, (2, 1, 28, 28)),
    ("mlp", {}, (2, 1, 28, 28)),
    ("mlp", {"in_features": 3 * 32 * 32, "hidden": [17], "num_classes": 7}, (2, 3, 32, 32)),
    ("mlp", {"in_features": 5, "hidden": [], "num_classes": 3}, (2, 5)),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]

# The small models only; ResNet-18 is exercised by its own tests to keep the file fast.
SMALL_CASES = [c for c in CASES if c[0] != "resnet18_cifar"]


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=CASE_IDS)
def test_output_shape_train_mode_batch_2(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, kwargs).train()
    logits = model(torch.randn(shape))
    expected_classes = kwargs.get("num_classes", 10)
    assert logits.shape == (shape[0], expected_classes)
    assert torch.isfinite(logits).all()
    assert num_classes_of(model) == expected_classes


def test_param_counts():
    resnet = ResNet18CIFAR()
    params = list(resnet.parameters())
    assert len(params) == 62
    assert sum(p.numel() for p in params) == 11_173_962
    n_small = sum(p.numel() for p in SmallCNN().parameters())
    assert 45_000 <= n_small <= 55_000
    assert n_small == 50_282
    assert sum(p.numel() for p in MLP().parameters()) == 269_322
    assert sum(p.numel() for p in VGGSmall().parameters()) == 666_538


def test_vgg_small_has_no_batchnorm():
    model = VGGSmall()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(list(model.buffers())) == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_spec_round_trip(name):
    model = build_model(name)
    spec = model.model_spec
    assert spec["name"] == name
    assert json.loads(json.dumps(spec)) == spec  # JSON-serialisable, no tuples lost
    rebuilt = build_model(**json.loads(json.dumps(spec)))
    assert type(rebuilt) is type(model)
    assert rebuilt.model_spec == spec
    original_sd, rebuilt_sd = model.state_dict(), rebuilt.state_dict()
    assert list(original_sd) == list(rebuilt_sd)
    for key in original_sd:
        assert original_sd[key].shape == rebuilt_sd[key].shape, key
    rebuilt.load_state_dict(original_sd)


@pytest.mark.parametrize(("name", "kwargs", "shape"), SMALL_CASES)
def test_model_spec_records_non_default_kwargs(name, kwargs, shape):
    model = build_model(name, kwargs)
    rebuilt = build_model(**model.model_spec)
    for key, value in kwargs.items():
        assert model.model_spec["kwargs"][key] == value
    assert [p.shape for p in model.parameters()] == [p.shape for p in rebuilt.parameters()]


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*mlp.*resnet18_cifar"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="bad kwargs for model 'mlp'"):
        build_model("mlp", {"no_such_arg": 1})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_under_manual_seed(name):
    torch.manual_seed(1234)
    first = build_model(name)
    torch.manual_seed(1234)
    second = build_model(name)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    torch.manual_seed(4321)
    third = build_model(name)
    # Models without a classifier head (the UNet) compare their first weight instead.
    key = (
        first.head_name + ".weight"
        if hasattr(first, "head_name")
        else next(iter(first.state_dict()))
    )
    assert not torch.equal(first.state_dict()[key], third.state_dict()[key])


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES, ids=CASE_IDS)
def test_float64_forward_backward(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, kwargs).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    logits = model(x)
    assert logits.dtype == torch.float64
    logits.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float64, pname
        assert torch.isfinite(p.grad).all(), pname


def test_wrong_input_geometry_is_explained():
    with pytest.raises(ValueError, match="built for inputs \\(1, 28, 28\\)"):
        SmallCNN()(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="built for inputs \\(3, 32, 32\\)"):
        VGGSmall()(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="built for 784 input features"):
        MLP()(torch.randn(2, 3, 32, 32))


def test_unsupported_sizes_rejected():
    with pytest.raises(ValueError, match="image_size must be >= 4"):
        SmallCNN(image_size=3)
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        VGGSmall(image_size=7)
    with pytest.raises(ValueError, match="two positive stage widths"):
        SmallCNN(widths=(8, 16, 32))


# ----------------------------------------------------------------------------- find_head


@pytest.mark.parametrize(
    ("name", "head_name"),
    [("small_cnn", "fc"), ("resnet18_cifar", "fc"), ("vgg_small", "head"), ("mlp", "fc")],
)
def test_find_head_on_zoo_models(name, head_name):
    model = build_model(name)
    assert model.head_name == head_name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zoo model must never need the fallback
        found_name, linear = find_head(model)
    assert found_name == head_name
    assert linear is model.get_submodule(head_name)
    assert isinstance(linear, nn.Linear)


class _UserNet(nn.Module):
    """A user model with no head_name: two Linears, the head is not at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
        self.norm = nn.LayerNorm(5)
        self.classifier = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.encoder(x)))


def test_find_head_explicit_name_on_user_model():
    model = _UserNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name, linear = find_head(model, head="encoder.0")
    assert name == "encoder.0" and linear is model.encoder[0]
    assert num_classes_of(model, head="encoder.0") == 5


def test_find_head_fallback_warns_and_picks_last_linear():
    model = _UserNet()
    with pytest.warns(UserWarning, match="using the last nn.Linear 'classifier.2'") as record:
        name, linear = find_head(model)
    assert name == "classifier.2" and linear is model.classifier[2]
    message = str(record[0].message)
    assert "head='classifier.2'" in message and "head_name" in message
    with pytest.warns(UserWarning, match="classifier.2"):
        assert num_classes_of(model) == 3


def test_find_head_user_head_name_attribute():
    model = _UserNet()
    model.head_name = "encoder.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_head(model)[0] == "encoder.0"
    # An explicit head wins over the attribute.
    assert find_head(model, head="classifier.2")[0] == "classifier.2"


def test_find_head_errors():
    model = _UserNet()
    with pytest.raises(ValueError, match="head='fc'.*no submodule.*'encoder.0', 'classifier.0'"):
        find_head(model, head="fc")
    with pytest.raises(ValueError, match="head='norm' is a LayerNorm, not an nn.Linear"):
        find_head(model, head="norm")
    with pytest.raises(ValueError, match="no nn.Linear submodule"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    broken = SmallCNN()
    broken.head_name = "classifier"
    with pytest.raises(ValueError, match="SmallCNN.head_name='classifier'.*no submodule"):
        find_head(broken)


# ------------------------------------------------------------------------------ head init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("in_features", "out_features"), [(512, 10), (37, 3), (1, 1)])
def test_reinit_head_matches_xavier_head_values(dtype, in_features, out_features):
    linear = nn.Linear(in_features, out_features).to(dtype)
    weight_storage = linear.weight.data_ptr()
    weight, bias = xavier_head_values(linear, generator=torch.Generator().manual_seed(7))
    before = linear.weight.detach().clone()
    assert torch.equal(linear.weight, before)  # the functional draw leaves the module alone
    assert weight.shape == (out_features, in_features) and bias.shape == (out_features,)
    assert weight.dtype == dtype and not weight.requires_grad

    returned = reinit_head_(linear, generator=torch.Generator().manual_seed(7))
    assert returned is linear
    assert linear.weight.data_ptr() == weight_storage  # in place, same storage
    assert torch.equal(linear.weight, weight)
    assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    assert torch.equal(bias, torch.zeros_like(bias))
    assert linear.weight.requires_grad and linear.bias.requires_grad


def test_reinit_head_bound_and_spread():
    fan_out, fan_in = 10, 512
    linear = nn.Linear(fan_in, fan_out)
    reinit_head_(linear, generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert linear.weight.abs().max() <= bound
    # 5120 uniform draws: the extreme reaches > 99 % of the bound with overwhelming probability.
    assert linear.weight.abs().max() > 0.99 * bound
    gained = xavier_head_values(linear, generator=torch.Generator().manual_seed(0), gain=2.0)[0]
    torch.testing.assert_close(gained, 2.0 * linear.weight.detach())


def test_reinit_head_matches_torch_xavier_uniform():
    linear = nn.Linear(37, 11)
    reinit_head_(linear, generator=torch.Generator().manual_seed(3))
    expected = torch.empty(11, 37)
    nn.init.xavier_uniform_(expected, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(linear.weight.detach(), expected)


def test_head_init_reproducible_and_independent_of_global_rng():
    linear = nn.Linear(20, 4)
    torch.manual_seed(0)
    a = xavier_head_values(linear, generator=torch.Generator().manual_seed(11))[0]
    torch.manual_seed(99)
    b = xavier_head_values(linear, generator=torch.Generator().manual_seed(11))[0]
    assert torch.equal(a, b)
    # One generator, two draws: the second differs (the generator state advanced).
    gen = torch.Generator().manual_seed(11)
    first = xavier_head_values(linear, generator=gen)[0]
    second = xavier_head_values(linear, generator=gen)[0]
    assert torch.equal(first, a) and not torch.equal(first, second)
    # Without a generator the global RNG is used, so manual_seed reproduces it.
    torch.manual_seed(5)
    c = xavier_head_values(linear)[0]
    torch.manual_seed(5)
    reinit_head_(linear)
    assert torch.equal(c, linear.weight)


def test_head_init_without_bias():
    linear = nn.Linear(8, 3, bias=False)
    weight, bias = xavier_head_values(linear, generator=torch.Generator().manual_seed(1))
    assert bias is None
    reinit_head_(linear, generator=torch.Generator().manual_seed(1))
    assert torch.equal(linear.weight, weight)


def test_reinit_zoo_head_keeps_model_working():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=7).double()
    _, head = find_head(model)
    reinit_head_(head, generator=torch.Generator().manual_seed(0))
    assert head.weight.dtype == torch.float64
    assert model(torch.randn(2, 1, 28, 28, dtype=torch.float64)).shape == (2, 7)
