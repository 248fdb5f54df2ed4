"""What differs between protecting a classifier and a noise-prediction model: the two Tasks.

SOPHON is one algorithm over two kinds of model. :func:`sophon_fast.driver.run_protection` runs
it once for both (device copy, resume, checkpoints, torch.distributed, engine options, export,
the result); a :class:`Task` supplies what differs:

===================  =====================================  =====================================
                     :class:`ClassificationTask`            :class:`DenoisingTask`
===================  =====================================  =====================================
``config.mode``      ``"classification"``                   ``"generation"``
data                 ``(images, labels)`` fitting the head  images (N, C, H, W), labels ignored
model wrapping       the model itself                       :class:`~sophon_fast.engine.generation.NoisePredictor`
engine               FastEngine / ReferenceEngine           GenerationFastEngine / ...ReferenceEngine
metric               ``accuracy`` (percent, higher better)  ``mse`` (denoising MSE, lower better)
guard                the intactness guard                   none (non-finite rollbacks only)
history / result     ``*_accuracy``                         ``*_mse``
===================  =====================================  =====================================

The metric, its direction and the guard live in the run class (:attr:`Task.run_class`,
:class:`~sophon_fast.engine.outer.ProtectionRun` or
:class:`~sophon_fast.engine.generation.GenerationRun`). :func:`sophon_fast.simulate` picks the
same Task and builds its engine with :meth:`Task.make_engine`, exactly as protect() does (the fast
engine's options included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from sophon_fast.config import ProtectConfig
from sophon_fast.data.checks import check_classification_data, check_num_classes
from sophon_fast.engine.generation import (
    GenerationFastEngine,
    GenerationReferenceEngine,
    GenerationRun,
    NoiseDraws,
    NoisePredictor,
    as_images,
    check_model_fits,
    noise_mse,
    suppression_loss_fn,
)
from sophon_fast.engine.inner import FastEngine
from sophon_fast.engine.outer import ProtectionRun
from sophon_fast.engine.sampling import as_tensors
from sophon_fast.losses import get_loss
from sophon_fast.models.head import find_head
from sophon_fast.reference.sophon import ReferenceEngine
from sophon_fast.result import SimulationResult

__all__ = ["ClassificationTask", "DenoisingTask", "Task", "TaskData", "task_for"]

Pair = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class TaskData:
    """A run's checked data on the CPU: ``(inputs, labels or None)`` per domain (generation has
    no labels; the driver hands the engines zeros). These pairs are also what a checkpoint's
    data fingerprints cover."""

    original: Pair
    restricted: Pair
    original_eval: Pair

    def named(self) -> dict[str, Pair]:
        return {
            "original": self.original,
            "restricted": self.restricted,
            "original_eval": self.original_eval,
        }


class Task(Protocol):
    """What a protection mode supplies to :func:`sophon_fast.driver.run_protection` and
    :func:`sophon_fast.simulate`. A Task object serves one call (it may keep what
    :meth:`prepare` found, e.g. the classifier's head)."""

    mode: ClassVar[str]
    run_class: ClassVar[type[ProtectionRun]]

    @property
    def metric(self) -> str: ...

    @property
    def higher_is_better(self) -> bool: ...

    def prepare(self, model, original, restricted, original_eval, config) -> TaskData:
        """Check and convert the user's data (CPU), before any copy of the model is made."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the engines train (the model, or a view of it)."""

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The user's kind of model back from :meth:`wrap`'s module."""

    def check_forward(self, work: nn.Module, data: TaskData, device, dtype) -> None:
        """One no-grad forward on two samples: a model that cannot take the data fails here."""

    def probe(self, config: ProtectConfig) -> tuple[str, int] | None:
        """(head name, classes) read by the representation term, or None (the term is off)."""

    def head(self, work: nn.Module, config: ProtectConfig) -> Any:
        """(name, nn.Linear) of the head re-drawn in every simulation, or None."""

    def make_engine(self, config, module, *, engine=None, restore_bn=None) -> Any:
        """The engine over ``module`` (``engine`` / ``restore_bn``: overrides of the config's)."""

    def result_fields(self, run: ProtectionRun) -> dict[str, Any]:
        """What of ``run`` the ProtectResult holds beyond model, history, config and stop."""

    def simulate(
        self, model, batches, adapt_masks, eval_masks, config, *, adversary, head_values, engine
    ) -> SimulationResult:
        """One simulation for :func:`sophon_fast.simulate` (validated inputs)."""


def task_for(config: ProtectConfig) -> Task:
    """A fresh Task for ``config.mode``."""
    return DenoisingTask() if config.mode == "generation" else ClassificationTask()


def check_mask_counts(batches, adapt_masks, eval_masks) -> None:
    if not (len(batches) == len(adapt_masks) == len(eval_masks)) or len(batches) == 0:
        raise ValueError(
            f"simulate: expected as many adapt and eval masks as batches (>= 1); got {len(batches)} batches, "
            f"{len(adapt_masks)} adapt masks, {len(eval_masks)} eval masks"
        )


def _check_nonempty(k: int, label: str, mask: torch.Tensor) -> None:
    if not bool(mask.any()):
        raise ValueError(f"simulate: batch {k}: the {label} mask selects no sample")


class _SharedTask:
    """What both tasks do alike: the metric from the run class, the engines' common arguments
    and one simulation on the engine protect() would build."""

    mode: ClassVar[str]
    run_class: ClassVar[type[ProtectionRun]]
    param_prefix: ClassVar[str] = ""  # of the wrapped module's parameter names

    @property
    def metric(self) -> str:
        return self.run_class.metric

    @property
    def higher_is_better(self) -> bool:
        return self.run_class.higher_is_better

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def head(self, work: nn.Module, config: ProtectConfig) -> Any:
        return None

    def probe(self, config: ProtectConfig) -> tuple[str, int] | None:
        return None

    def result_fields(self, run: ProtectionRun) -> dict[str, Any]:
        return {f"initial_original_{self.metric}": run.initial_original_metric}

    @staticmethod
    def _engine_kwargs(config: ProtectConfig, restore_bn: bool | None) -> dict[str, Any]:
        return dict(
            meta_lr=config.alpha * config.base_lr,
            ntr_lr=config.beta * config.base_lr,
            order=config.order,
            truncate=config.truncate,
            restore_bn=config.restore_bn if restore_bn is None else restore_bn,
            step_weighting=(config.step_weighting, config.step_weighting_rate),
        )

    def _simulate_on_engine(self, model, module, run_one, config, engine: str):
        """Run ``run_one(engine)`` on the engine protect() builds over ``module`` (statistics
        restored: the caller's model stays untouched); meta-gradients by ``model``'s names."""
        was_training = model.training
        try:
            runner = self.make_engine(config, module, engine=engine, restore_bn=True)
            loss, metric, grad = run_one(runner)
            if runner.name == "fast":
                grad = runner.named_grad(grad.to(runner.flat.params.dtype))
        finally:
            model.train(was_training)
        cut = len(self.param_prefix)
        return SimulationResult(
            loss=loss, accuracy=metric, meta_grad={name[cut:]: g for name, g in grad.items()}
        )


# --------------------------------------------------------------------------- classification


def _data_classes(data) -> int | None:
    value = getattr(data, "num_classes", None)
    return value if isinstance(value, int) else None


def _check_data(
    images, labels, *, name: str, num_classes: int, data_classes: int | None, allow_fewer: bool
) -> None:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name}: expected tensors, got {type(images).__name__} and {type(labels).__name__}"
        )
    check_classification_data(images, labels, num_classes=num_classes, name=name)
    if data_classes is not None:
        check_num_classes(num_classes, data_classes, name, allow_fewer=allow_fewer)


def _check_forward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One eval-mode forward of two samples: the model must return (2, num_classes) logits.

    A forward with fewer logits than the head has outputs failed deep inside the loss, after the
    set-up; in eval mode and without gradients this leaves the model (and BatchNorm statistics)
    untouched.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as error:  # the user's forward: any failure, reported with the input shape
        raise ValueError(
            f"model: the forward pass fails on two samples of shape {tuple(x.shape[1:])}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)
    expected = (min(2, x.shape[0]), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: the forward pass returns {got} for {expected[0]} samples; expected "
            f"logits {expected} (one per class of the head)"
        )


class ClassificationTask(_SharedTask):
    """A classifier: labelled data fitting its head, accuracy, the intactness guard."""

    mode: ClassVar[str] = "classification"
    run_class: ClassVar[type[ProtectionRun]] = ProtectionRun

    def __init__(self) -> None:
        self.head_name: str | None = None
        self.num_classes: int | None = None

    def prepare(self, model, original, restricted, original_eval, config) -> TaskData:
        head_name, head_linear = find_head(model, config.head)  # warns once for an unnamed head
        self.head_name, self.num_classes = head_name, head_linear.out_features
        domains = [("original", original, False), ("restricted", restricted, True)]
        if original_eval is not None:
            domains.append(("original_eval", original_eval, True))
        checked = {name: as_tensors(data, name) for name, data, _ in domains[:2]}
        for name, data, allow_fewer in domains:
            if name not in checked:  # original_eval: converted after the others' checks
                checked[name] = as_tensors(data, name)
            _check_data(
                *checked[name], name=name, num_classes=self.num_classes,
                data_classes=_data_classes(data), allow_fewer=allow_fewer,
            )  # fmt: skip
        original_x, original_y = checked["original"]
        restricted_x, restricted_y = checked["restricted"]
        eval_x, eval_y = checked.get("original_eval", checked["original"])
        if config.eval_size is not None:
            eval_x, eval_y = eval_x[: config.eval_size], eval_y[: config.eval_size]
        if restricted_y.shape[0] < config.batch_size:
            raise ValueError(
                f"restricted: {restricted_y.shape[0]} samples, fewer than batch_size={config.batch_size}"
            )
        if config.ntr_steps and original_y.shape[0] < config.batch_size:
            raise ValueError(
                f"original: {original_y.shape[0]} samples, fewer than batch_size={config.batch_size}"
            )
        shapes = [tuple(x.shape[1:]) for x in (original_x, restricted_x, eval_x)]
        if len(set(shapes)) != 1:
            raise ValueError(
                f"original / restricted / original_eval samples differ in shape: {shapes[0]}, "
                f"{shapes[1]}, {shapes[2]}; the model takes one input shape"
            )
        return TaskData((original_x, original_y), (restricted_x, restricted_y), (eval_x, eval_y))

    def check_forward(self, work: nn.Module, data: TaskData, device, dtype) -> None:
        _check_forward(work, data.original[0][:2].to(device=device, dtype=dtype), self.num_classes)

    def probe(self, config: ProtectConfig) -> tuple[str, int] | None:
        if not config.representation_weight:
            return None
        return self.head_name if self.head_name is not None else config.head, self.num_classes

    def head(self, work: nn.Module, config: ProtectConfig) -> Any:
        distribution = config.adversary_distribution
        may_redraw = distribution is not None and distribution.reinit_head
        if not config.reinit_head_resolved and not may_redraw:
            return None
        name = self.head_name if self.head_name is not None else config.head
        return find_head(work, name)

    def make_engine(self, config, module, *, engine=None, restore_bn=None):
        kwargs = self._engine_kwargs(config, restore_bn)
        kwargs.update(
            suppression_loss=get_loss(config.loss),
            adapt_loss=get_loss("ce"),
            ntr_loss=get_loss("ce"),
        )
        if (config.engine if engine is None else engine) == "fast":
            return FastEngine(module, **kwargs, options=config.engine_options)
        return ReferenceEngine(module, **kwargs)

    def simulate(
        self, model, batches, adapt_masks, eval_masks, config, *, adversary, head_values, engine
    ) -> SimulationResult:
        check_mask_counts(batches, adapt_masks, eval_masks)
        for k, ((x, y), adapt, evaluate) in enumerate(zip(batches, adapt_masks, eval_masks)):
            for label, mask in (("adapt", adapt), ("eval", evaluate)):
                if mask.dtype != torch.bool or mask.shape != y.shape or x.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"simulate: batch {k}: expected x (B, ...), y (B,) and a (B,) bool {label} mask; got x "
                        f"{tuple(x.shape)}, y {tuple(y.shape)}, mask {tuple(mask.shape)} {mask.dtype}"
                    )
                _check_nonempty(k, label, mask)
        names = dict(model.named_parameters())
        for name, value in (head_values or {}).items():
            if name not in names or names[name].shape != value.shape:
                raise ValueError(
                    f"simulate: head_values[{name!r}] does not match a parameter of the model"
                )

        def run_one(runner):
            return runner.simulate(batches, adapt_masks, eval_masks, head_values, adversary)

        return self._simulate_on_engine(model, model, run_one, config, engine)


# --------------------------------------------------------------------------- generation


class DenoisingTask(_SharedTask):
    """A DDPM noise predictor ``forward(x, t)``: images in its range, the denoising MSE, no guard
    (:mod:`sophon_fast.engine.generation`)."""

    mode: ClassVar[str] = "generation"
    run_class: ClassVar[type[ProtectionRun]] = GenerationRun
    param_prefix: ClassVar[str] = "model."  # NoisePredictor's

    def __init__(self) -> None:
        self.draws: NoiseDraws | None = None
        self.model: nn.Module | None = None

    def prepare(self, model, original, restricted, original_eval, config) -> TaskData:
        original_x = as_images(original, "original")
        restricted_x = as_images(restricted, "restricted")
        eval_x = original_x if original_eval is None else as_images(original_eval, "original_eval")
        for label, images in (("original", original_x), ("restricted", restricted_x)):
            check_model_fits(model, images, label)
        shapes = [tuple(x.shape[1:]) for x in (original_x, restricted_x, eval_x)]
        if len(set(shapes)) != 1:
            raise ValueError(
                f"original / restricted / original_eval images differ in shape: {shapes[0]}, "
                f"{shapes[1]}, {shapes[2]}; the model takes one image shape"
            )
        if config.eval_size is not None:
            eval_x = eval_x[: config.eval_size]
        if restricted_x.shape[0] < config.batch_size:
            raise ValueError(
                f"restricted: {restricted_x.shape[0]} images, fewer than batch_size={config.batch_size}"
            )
        if config.ntr_steps and original_x.shape[0] < config.batch_size:
            raise ValueError(
                f"original: {original_x.shape[0]} images, fewer than batch_size={config.batch_size}"
            )
        self.draws = NoiseDraws.from_config(config)
        if self.draws.alpha_bars.shape[0] != config.diffusion_steps:
            raise ValueError("noise schedule length differs from ProtectConfig.diffusion_steps")
        self.model = model
        return TaskData((original_x, None), (restricted_x, None), (eval_x, None))

    def wrap(self, model: nn.Module) -> nn.Module:
        return NoisePredictor(model)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.model

    def check_forward(self, work: nn.Module, data: TaskData, device, dtype) -> None:
        with torch.no_grad():  # one forward on two images: a model that cannot take them fails
            probe = data.restricted[0][:2].to(device=device, dtype=dtype)
            t = self.draws.timesteps[:1].expand(probe.shape[0]).to(device)
            try:
                out = work(self.draws.pack(probe, t, torch.zeros_like(probe)))
            except (RuntimeError, ValueError) as error:
                raise ValueError(
                    f"model: {type(self.model).__name__} cannot predict noise for images of shape "
                    f"{tuple(probe.shape[1:])}: {error}"
                ) from None
            if out.shape != probe.shape:
                raise ValueError(
                    f"model: a noise-prediction model must return its input's shape "
                    f"{tuple(probe.shape)}, got {tuple(out.shape)}"
                )

    def make_engine(self, config, module, *, engine=None, restore_bn=None):
        draws = self.draws if self.draws is not None else NoiseDraws.from_config(config)
        kwargs = self._engine_kwargs(config, restore_bn)
        kwargs.update(
            suppression_loss=suppression_loss_fn(config.loss), adapt_loss=noise_mse,
            ntr_loss=noise_mse, draws=draws,
        )  # fmt: skip
        if (config.engine if engine is None else engine) == "fast":
            return GenerationFastEngine(module, **kwargs, options=config.engine_options)
        return GenerationReferenceEngine(module, **kwargs)

    def simulate(
        self, model, batches, adapt_masks, eval_masks, config, *, adversary, head_values, engine
    ) -> SimulationResult:
        """``batches`` are K triples ``(x0 (B, C, H, W), noise (B, C, H, W), t (B,) int64)``;
        the result's ``accuracy`` is the mean denoising MSE of the evaluation samples after each
        step; ``head_values`` is not used (a noise predictor has no head to re-draw)."""
        check_mask_counts(batches, adapt_masks, eval_masks)
        draws = self.draws = NoiseDraws.from_config(config)
        noised = []
        for k, batch in enumerate(batches):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
                raise ValueError(
                    f"simulate: generation batch {k} must be a (x0, noise, t) triple, got "
                    f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
                )
            x0, noise, t = batch
            if x0.dim() != 4 or noise.shape != x0.shape or t.shape != (x0.shape[0],):
                raise ValueError(
                    f"simulate: batch {k}: expected x0 (B, C, H, W), noise like x0 and t (B,); got "
                    f"{tuple(x0.shape)}, {tuple(noise.shape)}, {tuple(t.shape)}"
                )
            check_model_fits(model, x0, f"simulate: batch {k}")
            for label, mask in (("adapt", adapt_masks[k]), ("eval", eval_masks[k])):
                if mask.dtype != torch.bool or mask.shape != t.shape:
                    raise ValueError(f"simulate: batch {k}: expected a (B,) bool {label} mask")
                _check_nonempty(k, label, mask)
            noised.append((draws.pack(x0, t.to(torch.int64), noise), noise))

        def run_one(runner):
            return runner.simulate_noised(noised, adapt_masks, eval_masks, adversary)

        return self._simulate_on_engine(model, self.wrap(model), run_one, config, engine)
