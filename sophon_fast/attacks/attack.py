"""One configurable fine-tuning attack (:class:`Attack`) and the loop that runs it (:func:`run_attack`).

An attack is a scope (which parameters train), an optimizer with its learning rate, a
learning-rate schedule, a batch size, a fraction of the restricted training data, an epoch
budget, and optionally a cheap probe applied before fine-tuning.

Scopes (``Attack.scope``):

==================  ==========================================================================
``full``            every parameter, existing head (the official SOPHON evaluation)
``reinit_head_full``  head re-drawn (Xavier-uniform, zero bias), then every parameter
``linear_probe``    head re-drawn, only the head trains
``head_only``       existing head, only the head trains
``last_k``          the last ``last_k`` blocks train (block = a Conv/Linear layer plus the
                    normalisation layers right after it, in module order)
``bn_only``         only normalisation-layer affine parameters (BatchNorm/LayerNorm/GroupNorm)
``lora``            rank-``lora_rank`` adapters on every Linear and Conv2d, merged back after
==================  ==========================================================================

Frozen parameters stay bit-identical. Normalisation layers whose parameters are frozen run in
eval mode (their running statistics stay as they are, as in a frozen feature extractor); the
``bn_recal`` probe is the attack that updates statistics alone.

Optimizers: ``sgd`` (no momentum), ``momentum`` (0.9), ``nesterov`` (0.9), ``adam``, ``adamw``,
``adagrad``, ``adadelta``, ``rmsprop``. Schedules, stepped once per mini-batch: ``constant``,
``cosine`` (to zero at the last step), ``warmup_cosine`` (linear warm-up over ``warmup`` of the
steps, then cosine).

Probes (``Attack.probe``), applied before the first test pass: ``bn_recal`` (BatchNorm running
statistics re-estimated on the restricted training data, cumulative average), ``reinit_last_k``
(the last ``last_k`` blocks re-initialised), ``noise`` (Gaussian noise of ``noise`` times each
tensor's standard deviation added to every parameter).

Test passes never drop the last partial batch (:func:`sophon_fast.training.accuracy`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.head import find_head, reinit_head_
from ..training import accuracy, as_tensors
from .lora import add_lora, merge_lora

__all__ = [
    "Attack",
    "OPTIMIZERS",
    "PROBES",
    "SCHEDULES",
    "SCOPES",
    "apply_scope",
    "blocks_of",
    "run_attack",
]

SCOPES = ("full", "reinit_head_full", "linear_probe", "head_only", "last_k", "bn_only", "lora")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "adadelta", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
PROBES = ("none", "bn_recal", "reinit_last_k", "noise")
# weight decay when Attack.weight_decay is None: the official SGD evaluation uses 1e-4; AdamW's
# decoupled decay is conventionally 1e-2; the other adaptive optimizers default to none.
DEFAULT_WEIGHT_DECAY = {
    "sgd": 1e-4,
    "momentum": 1e-4,
    "nesterov": 1e-4,
    "adam": 0.0,
    "adamw": 1e-2,
    "adagrad": 0.0,
    "adadelta": 0.0,
    "rmsprop": 0.0,
}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class Attack:
    """A fine-tuning attack recipe; every field is plain data (JSON round-trips it).

    Attributes:
        scope: which parameters train, one of ``SCOPES``. Default "full".
        optimizer: one of ``OPTIMIZERS``. Default "momentum".
        lr: peak learning rate, > 0. Default 1e-2.
        schedule: one of ``SCHEDULES``. Default "constant".
        warmup: fraction of the steps spent warming up (``warmup_cosine``), in [0, 1). Default 0.1.
        batch_size: mini-batch size; the last partial batch of an epoch is kept. Default 128.
        epochs: passes over the (fractional) restricted training data. Default 20.
        data_fraction: share of the restricted training set the attacker has, in (0, 1]; the
            subset is drawn per seed. Default 1.0.
        weight_decay: None picks ``DEFAULT_WEIGHT_DECAY[optimizer]``. Default None.
        last_k: blocks trained by ``last_k`` / re-initialised by ``reinit_last_k``. Default 2.
        lora_rank: adapter rank for ``lora``. Default 8.
        probe: one of ``PROBES``, applied before fine-tuning. Default "none".
        noise: relative weight-noise scale for the ``noise`` probe. Default 0.01.
    """

    scope: str = "full"
    optimizer: str = "momentum"
    lr: float = 1e-2
    schedule: str = "constant"
    warmup: float = 0.1
    batch_size: int = 128
    epochs: int = 20
    data_fraction: float = 1.0
    weight_decay: float | None = None
    last_k: int = 2
    lora_rank: int = 8
    probe: str = "none"
    noise: float = 0.01

    def __post_init__(self) -> None:
        for name, options in (
            ("scope", SCOPES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("probe", PROBES),
        ):
            if getattr(self, name) not in options:
                raise ValueError(
                    f"Attack.{name} must be one of {options}, got {getattr(self, name)!r}"
                )
        for name in ("batch_size", "epochs", "last_k", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Attack.{name} must be an int, got {value!r}")
        for name in ("lr", "warmup", "data_fraction", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"Attack.{name} must be a number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"Attack.lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(
                f"Attack needs batch_size >= 1 and epochs >= 0, got {self.batch_size}, {self.epochs}"
            )
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"Attack.data_fraction must be in (0, 1], got {self.data_fraction}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"Attack.warmup must be in [0, 1), got {self.warmup}")
        if self.last_k < 1 or self.lora_rank < 1:
            raise ValueError(
                f"Attack.last_k and Attack.lora_rank must be >= 1, got {self.last_k}, {self.lora_rank}"
            )
        if self.noise < 0:
            raise ValueError(f"Attack.noise must be >= 0, got {self.noise}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"Attack.weight_decay must be >= 0 or None, got {self.weight_decay}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attack:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown attack field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """A stable 12-hex-digit identifier of this recipe (used in cell ids and seeds)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``full/adam lr=0.001 cosine bs128``."""
        scope = self.scope
        if self.scope == "last_k":
            scope = f"last{self.last_k}"
        elif self.scope == "lora":
            scope = f"lora{self.lora_rank}"
        text = f"{scope}/{self.optimizer} lr={self.lr:g}"
        if self.schedule != "constant":
            text += f" {self.schedule}"
        text += f" bs{self.batch_size}"
        if self.data_fraction < 1:
            text += f" data={self.data_fraction:g}"
        if self.probe != "none":
            text += f" +{self.probe}"
        return text

    def resolved_weight_decay(self) -> float:
        return (
            DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
        )

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        wd, lr = self.resolved_weight_decay(), self.lr
        name = self.optimizer
        if name in ("sgd", "momentum", "nesterov"):
            momentum = 0.0 if name == "sgd" else 0.9
            return torch.optim.SGD(
                params, lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=wd
            )
        cls = {
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "adagrad": torch.optim.Adagrad,
            "adadelta": torch.optim.Adadelta,
            "rmsprop": torch.optim.RMSprop,
        }[name]
        return cls(params, lr=lr, weight_decay=wd)

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak lr at mini-batch ``step`` of ``total``."""
        if self.schedule == "constant" or total <= 0:
            return 1.0
        warm = int(self.warmup * total) if self.schedule == "warmup_cosine" else 0
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def blocks_of(model: nn.Module) -> list[list[str]]:
    """Blocks in module order: each a weight layer's name plus the normalisation layers after it."""
    blocks: list[list[str]] = []
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            blocks.append([name])
        elif isinstance(module, _NORMS):
            if blocks:
                blocks[-1].append(name)
            else:
                blocks.append([name])
    return blocks


def _params_under(model: nn.Module, names: list[str]) -> list[str]:
    prefixes = tuple(f"{n}." for n in names)
    return [p for p, _ in model.named_parameters() if p.startswith(prefixes)]


def apply_scope(model: nn.Module, attack: Attack, generator: torch.Generator) -> list[nn.Parameter]:
    """Prepare ``model`` (in place) for ``attack.scope``; returns the parameters to train.

    Freezes the others (``requires_grad=False``), re-draws the head for head-replacing scopes and
    wraps layers in LoRA adapters for ``lora``.

    Raises:
        ValueError: the scope does not fit the model (no normalisation layer for ``bn_only``,
            fewer than ``last_k`` blocks).
    """
    scope = attack.scope
    if scope in ("reinit_head_full", "linear_probe"):
        reinit_head_(find_head(model)[1], generator=generator)
    if scope in ("full", "reinit_head_full"):
        names = [n for n, _ in model.named_parameters()]
    elif scope in ("linear_probe", "head_only"):
        names = _params_under(model, [find_head(model)[0]])
    elif scope == "last_k":
        blocks = blocks_of(model)
        if attack.last_k > len(blocks):
            raise ValueError(
                f"scope last_k: last_k={attack.last_k} but {type(model).__name__} has only "
                f"{len(blocks)} blocks"
            )
        names = _params_under(model, [n for block in blocks[-attack.last_k :] for n in block])
    elif scope == "bn_only":
        norms = [n for n, m in model.named_modules() if isinstance(m, _NORMS)]
        names = _params_under(model, norms)
        if not names:
            raise ValueError(
                f"scope bn_only: {type(model).__name__} has no normalisation layer with affine "
                "parameters"
            )
    else:  # lora
        for p in model.parameters():
            p.requires_grad_(False)
        return add_lora(model, attack.lora_rank, generator=generator)
    chosen = set(names)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            params.append(p)
    return params


def _set_train_mode(model: nn.Module) -> None:
    """Train mode, except normalisation layers whose parameters are all frozen."""
    model.train()
    for module in model.modules():
        if isinstance(module, _NORMS):
            own = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                module.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics on ``images`` (N, ...) (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = []
    for m in norms:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    model.train(was_training)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def _apply_probe(model: nn.Module, attack: Attack, images: torch.Tensor, generator) -> None:
    if attack.probe == "bn_recal":
        recalibrate_bn(model, images)
    elif attack.probe == "reinit_last_k":
        blocks = blocks_of(model)
        if attack.last_k > len(blocks):
            raise ValueError(
                f"probe reinit_last_k: last_k={attack.last_k} but {type(model).__name__} has only "
                f"{len(blocks)} blocks"
            )
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        try:
            for block in blocks[-attack.last_k :]:
                for name in block:
                    module = model.get_submodule(name)
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        finally:
            torch.random.set_rng_state(state)
    elif attack.probe == "noise":
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1:
                    draw = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                    p.add_(draw * (attack.noise * p.std()))


def subset(images: torch.Tensor, labels: torch.Tensor, fraction: float, generator):
    """A random ``fraction`` of (images, labels), at least one sample, drawn with ``generator``."""
    if fraction >= 1:
        return images, labels
    n = max(1, round(fraction * len(labels)))
    index = torch.randperm(len(labels), generator=generator)[:n].to(labels.device)
    return images[index], labels[index]


def run_attack(
    model: nn.Module,
    train,
    test,
    attack: Attack,
    *,
    seed: int = 0,
    original_test=None,
    device=None,
    epochs: int | None = None,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Attack a deep copy of ``model``; returns the cell metrics (plain data).

    Args:
        model: the model under attack (not modified).
        train: restricted training data, (images (N, ...), labels (N,)) or a dataset.
        test: restricted test data, same forms.
        attack: the recipe.
        seed: seeds the data subset, head/LoRA/probe draws and batch order.
        original_test: original-domain test data, for intactness before/after; None skips it.
        device: where to run (default: the model's device).
        epochs: overrides ``attack.epochs``.
        keep_model: also return the attacked copy under ``"model"``.

    Returns:
        ``curve`` (restricted test accuracy % at epoch 0 — after the probe — and after every
        epoch), ``original_accuracy_before``/``_after`` (None without ``original_test``),
        ``seconds``.
    """
    started = time.perf_counter()
    epochs = attack.epochs if epochs is None else epochs
    device = torch.device(device) if device is not None else next(model.parameters()).device
    victim = copy.deepcopy(model).to(device)
    dtype = next(victim.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    images, labels = as_tensors(train)
    images, labels = subset(images, labels, attack.data_fraction, generator)
    images, labels = images.to(device=device, dtype=dtype), labels.to(device)
    original_before = (
        accuracy(victim, original_test, device=device) if original_test is not None else None
    )
    _apply_probe(victim, attack, images, generator)
    params = apply_scope(victim, attack, generator)
    optimizer = attack.make_optimizer(params)
    steps_per_epoch = math.ceil(len(labels) / attack.batch_size)
    total = steps_per_epoch * epochs
    curve = [accuracy(victim, test, device=device)]
    step = 0
    for _ in range(epochs):
        _set_train_mode(victim)
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), attack.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = attack.lr * attack.lr_factor(step, total)
            index = order[start : start + attack.batch_size]
            loss = F.cross_entropy(victim(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        curve.append(accuracy(victim, test, device=device))
    if attack.scope == "lora":
        merge_lora(victim)
    original_after = (
        accuracy(victim, original_test, device=device) if original_test is not None else None
    )
    result = {
        "curve": curve,
        "original_accuracy_before": original_before,
        "original_accuracy_after": original_after,
        "seconds": time.perf_counter() - started,
    }
    if keep_model:
        result["model"] = victim
    return result
