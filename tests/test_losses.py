"""Suppression and training losses: values against naive formulas, stability, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from sophon_fast.losses import SUPPRESSION_LOSSES, get_loss, loss_names, register_loss
from sophon_fast.ops import losses as fused_losses
from sophon_fast.reference.losses import (
    cross_entropy,
    inverse_cross_entropy,
    inverse_cross_entropy_paper,
    kl_uniform,
)

ALL = [inverse_cross_entropy, inverse_cross_entropy_paper, kl_uniform, cross_entropy]
SHAPES = [(1, 2), (7, 3), (5, 10), (3, 17)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with 2 OpenMP threads on shared cores, libgomp's spin-wait makes each op
    ~100x slower; one thread avoids it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _data(batch, classes, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, classes, (batch,), generator=g)
    return logits, labels


@pytest.mark.parametrize("shape", SHAPES)
def test_ice_is_cross_entropy_on_negated_logits(shape):
    logits, labels = _data(*shape)
    official = F.cross_entropy(1 - logits, labels)  # the official code's expression
    naive = (
        logits.gather(1, labels[:, None]).squeeze(1) + torch.log(torch.exp(-logits).sum(1))
    ).mean()
    torch.testing.assert_close(
        inverse_cross_entropy(logits, labels), official, rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(inverse_cross_entropy(logits, labels), naive, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_ice_paper_matches_naive_formula(shape):
    logits, labels = _data(*shape)
    p_true = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    naive = (-torch.log(1 - p_true)).mean()
    torch.testing.assert_close(
        inverse_cross_entropy_paper(logits, labels), naive, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_klu_matches_kl_div_and_naive_formula(shape):
    logits, labels = _data(*shape)
    classes = shape[1]
    uniform = torch.full_like(logits, 1.0 / classes)
    via_torch = F.kl_div(torch.log_softmax(logits, 1), uniform, reduction="batchmean")
    p = torch.softmax(logits, 1)
    naive = (uniform * (uniform.log() - p.log())).sum(1).mean()
    torch.testing.assert_close(kl_uniform(logits, labels), via_torch, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(kl_uniform(logits), naive, rtol=1e-12, atol=1e-13)


def test_klu_of_uniform_logits_is_zero_for_any_class_count():
    for classes in (2, 3, 10, 13):  # the official u = 0.1 is only uniform for 10 classes
        assert abs(float(kl_uniform(torch.zeros(4, classes, dtype=torch.float64)))) < 1e-15


@pytest.mark.parametrize("shape", SHAPES)
def test_ce_matches_torch(shape):
    logits, labels = _data(*shape)
    torch.testing.assert_close(
        cross_entropy(logits, labels), F.cross_entropy(logits, labels), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [2, 5])
def test_ice_paper_finite_at_gap_100(dtype, classes):
    logits = torch.zeros(3, classes, dtype=dtype)
    labels = torch.tensor([0, 1, classes - 1])
    logits[torch.arange(3), labels] = 100.0
    logits.requires_grad_(True)
    p_true = torch.softmax(logits, 1).gather(1, labels[:, None])
    assert torch.isinf(-torch.log(1 - p_true)).all()  # the naive form overflows here
    value = inverse_cross_entropy_paper(logits, labels)
    # exact: log(e^100 + (C - 1)) - log(C - 1) = 100 - log(C - 1) + log1p((C - 1) e^-100)
    expected = 100.0 - math.log(classes - 1)
    assert abs(float(value.detach()) - expected) <= 1e-5 * expected
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ALL, ids=lambda f: f.__name__)
def test_finite_at_extreme_logits(loss, dtype):
    logits = torch.tensor(
        [[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [0.0, 0.0, 1e4]], dtype=dtype, requires_grad=True
    )
    labels = torch.tensor([0, 0, 2])
    value = loss(logits, labels)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_ice_paper_one_class_raises():
    with pytest.raises(ValueError, match="1 class"):
        inverse_cross_entropy_paper(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64))


def test_analytic_gradients():
    logits, labels = _data(6, 4)
    logits.requires_grad_(True)
    onehot = F.one_hot(labels, 4).double()
    (g_ice,) = torch.autograd.grad(inverse_cross_entropy(logits, labels), logits)
    torch.testing.assert_close(
        g_ice, (onehot - torch.softmax(-logits, 1)).detach() / 6, rtol=1e-13, atol=1e-15
    )
    (g_klu,) = torch.autograd.grad(kl_uniform(logits), logits)
    torch.testing.assert_close(
        g_klu, (torch.softmax(logits, 1) - 0.25).detach() / 6, rtol=1e-13, atol=1e-15
    )


@pytest.mark.parametrize("loss", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(3, 2), (4, 5)])
def test_gradcheck_and_gradgradcheck(loss, shape):
    logits, labels = _data(*shape, scale=2.0)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits,))
    assert torch.autograd.gradgradcheck(lambda z: loss(z, labels), (logits,))


@pytest.mark.parametrize("loss", ALL, ids=lambda f: f.__name__)
def test_bad_shapes_raise(loss):
    with pytest.raises(ValueError, match="logits must be"):
        loss(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty batch"):
        loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


def test_registry():
    assert set(SUPPRESSION_LOSSES) == {"ice", "ice_paper", "klu"}
    assert set(loss_names()) >= {"ice", "ice_paper", "klu", "ce"}
    assert get_loss("ice") is fused_losses.inverse_cross_entropy
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(TypeError):
        register_loss("ice", 3)
    register_loss("ice", inverse_cross_entropy)
    assert get_loss("ice") is inverse_cross_entropy
    register_loss("ice", fused_losses.inverse_cross_entropy)  # leave the registry as found
