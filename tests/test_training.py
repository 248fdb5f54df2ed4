"""Pre-training, accuracy and the fine-tuning attack helper."""

import pytest
import torch

from sophon_fast.attacks import FineTuneAttack, finetune
from sophon_fast.models import MLP
from sophon_fast.training import accuracy, train_classifier


def _blobs(n=120, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    images = centers[labels] + 0.4 * torch.randn(n, 2, generator=generator)
    return images, labels


def test_training_learns_and_is_deterministic():
    data = _blobs()
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        model = MLP(in_features=2, hidden=(16,), num_classes=3)
        train_classifier(model, data, epochs=15, lr=1e-2, batch_size=16, seed=5)
        models.append(model)
    assert accuracy(models[0], data) > 95.0
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_accuracy_restores_mode_and_keeps_partial_batches():
    images, labels = _blobs(n=7)
    model = MLP(in_features=2, hidden=(4,), num_classes=3).train()
    predictions = model.eval()(images).argmax(1)
    model.train()
    expected = 100.0 * (predictions == labels).float().mean().item()
    assert accuracy(model, (images, labels), batch_size=3) == pytest.approx(expected)
    assert model.training


def test_finetune_trains_a_copy_and_returns_a_curve():
    train, test = _blobs(seed=1), _blobs(seed=2)
    model = MLP(in_features=2, hidden=(16,), num_classes=3)
    before = [p.clone() for p in model.parameters()]
    curve = finetune(model, train, test, FineTuneAttack(lr=0.05, epochs=4, batch_size=16), seed=0)
    assert len(curve) == 5
    assert curve[-1] > curve[0] and curve[-1] > 90.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_attack_recipe_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FineTuneAttack(**kwargs)


def test_empty_evaluation_data_raises():
    with pytest.raises(ValueError, match="empty"):
        accuracy(
            MLP(in_features=2, hidden=(), num_classes=3),
            (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),
        )
