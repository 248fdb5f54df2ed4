"""What :func:`sophon_fast.protect` and :func:`sophon_fast.simulate` return, and the folder format
of :meth:`ProtectResult.save` / :meth:`ProtectResult.load`.

A saved result is two files: ``model.safetensors`` (weights and buffers, never pickled) and
``result.json`` (config, history, model spec, the initial original-domain metric, how the run
stopped and its non-finite rollbacks). Classification records accuracies
(``original_accuracy``, ``initial_original_accuracy``), generation records denoising MSEs
(``original_mse``, ``initial_original_mse``); each is saved and loaded under its own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sophon_fast._json import strict_json
from sophon_fast.config import ProtectConfig
from sophon_fast.engine.checkpoint import atomic_save_tensors, atomic_write_text, nonfinite_tensors
from sophon_fast.models.classifiers import build_model

__all__ = ["METRICS", "ProtectResult", "SimulationResult"]

#: The original-domain metric each ``ProtectConfig.mode`` records (see :mod:`sophon_fast.tasks`).
METRICS = {"classification": "accuracy", "generation": "mse"}


@dataclass
class ProtectResult:
    """What :func:`protect` returns.

    Attributes:
        model: the protected model (a copy; the caller's model is untouched).
        history: one dict per outer step: ``step``, ``suppression_loss``,
            ``restricted_<metric>`` (evaluation samples inside the simulations),
            ``ntr_loss``, ``original_<metric>`` (None when not measured),
            ``adversaries`` (labels of the simulated optimizers), ``guard`` (None,
            "rollback_stop", "rollback_continue", "nonfinite_stop" or "nonfinite_continue"),
            ``seconds``. The metric (:attr:`metric`) is ``accuracy`` (percent) in
            classification and ``mse`` (denoising MSE) in generation mode.
        config: the :class:`ProtectConfig` used.
        initial_original_accuracy: original accuracy (percent) before protection, or None
            (always None in generation mode).
        stopped_by: None (completion), "guard", "nonfinite" (a NaN or infinity, rolled back;
            see :mod:`sophon_fast.engine.outer`) or "callback". :attr:`outcome` says it in words.
        initial_original_mse: generation mode: the original-domain denoising MSE before
            protection, or None.
        events: one dict per non-finite rollback (``step``, ``quantities``,
            ``rolled_back_to``).
    """

    model: nn.Module
    history: list[dict[str, Any]]
    config: ProtectConfig
    initial_original_accuracy: float | None = None
    stopped_by: str | None = None
    initial_original_mse: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    WEIGHTS = "model.safetensors"
    META = "result.json"

    @property
    def metric(self) -> str:
        """The original-domain metric the history records: "accuracy" or "mse"."""
        return METRICS[getattr(self.config, "mode", "classification")]

    @property
    def initial_original_metric(self) -> float | None:
        """The starting original-domain metric of this mode (accuracy or MSE), or None."""
        return getattr(self, f"initial_original_{self.metric}")

    @property
    def outcome(self) -> str:
        """How the run ended, in words: never "completion" for a guard or non-finite stop, nor
        for a ``guard_action="continue"`` run whose every checked step was rolled back."""
        last = self.history[-1]["step"] if self.history else 0
        if self.stopped_by == "guard":
            return f"the intactness guard at step {last} (rolled back to the last good state)"
        if self.stopped_by == "nonfinite":
            return f"a non-finite value at step {last} (rolled back to the last good state)"
        if self.stopped_by == "callback":
            return f"a callback at step {last}"
        continued = ("rollback_continue", "nonfinite_continue")
        rolled = sum(1 for h in self.history if h.get("guard") in continued)
        checked = sum(
            1
            for h in self.history
            if h.get(f"original_{self.metric}") is not None or h.get("guard")
        )
        if rolled and rolled == checked:
            return (
                f"completion, but every one of the {rolled} checked steps was rolled back: the "
                "model is the starting or last good state, not a protected one"
            )
        if rolled:
            return f"completion ({rolled} of {len(self.history)} steps rolled back)"
        return "completion"

    def save(self, directory: str | Path, *, allow_nonfinite: bool = False) -> Path:
        """Write ``model.safetensors`` (weights and buffers) and ``result.json`` (config, history,
        model_spec, head) to ``directory``, each atomically. Returns the directory.

        Raises:
            ValueError: a weight or buffer holds NaN or infinity (nothing is written), unless
                ``allow_nonfinite=True``.
        """
        directory = Path(directory)
        state = dict(self.model.state_dict())
        bad = nonfinite_tensors(state)
        if bad and not allow_nonfinite:
            raise ValueError(
                f"ProtectResult.save: the model holds NaN or infinite values in {bad[:4]}"
                f"{' ...' if len(bad) > 4 else ''}; nothing written (pass allow_nonfinite=True "
                "to save it anyway)"
            )
        atomic_save_tensors(directory / self.WEIGHTS, state)
        meta = {
            "format": "sophon_fast.ProtectResult/1",
            "config": self.config.to_dict(),
            "history": self.history,
            "model_spec": getattr(self.model, "model_spec", None),
            "model_class": type(self.model).__name__,
            "initial_original_accuracy": self.initial_original_accuracy,
            "stopped_by": self.stopped_by,
        }
        if self.metric != "accuracy":
            meta[f"initial_original_{self.metric}"] = self.initial_original_metric
        if self.events:
            meta["events"] = self.events  # non-finite rollbacks: step, quantities, restored step
        atomic_write_text(directory / self.META, strict_json(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> ProtectResult:
        """Load a result written by :meth:`save`; never unpickles.

        Every way the folder can be wrong is one error naming the file and what is wrong: a
        missing folder or file, a file where the folder is expected, a truncated or empty
        ``model.safetensors``, a ``result.json`` that is not UTF-8 JSON of the saved shape, or a
        ``model_spec`` whose architecture differs from the saved weights. The architecture is
        first built on the meta device (no memory) and compared with the shapes in the weights
        file's header, so sizes read from ``result.json`` are bounded by the weights actually
        on disk (``num_classes=10**13`` tried to allocate 1.28 PB).

        Args:
            directory: the directory given to :meth:`save`.
            model: a module of the saved architecture to load the weights into (in place); None
                rebuilds a zoo model from the saved ``model_spec``.

        Raises:
            FileNotFoundError: a missing folder or file.
            NotADirectoryError: ``directory`` is a file.
            ValueError: a corrupt file, no ``model`` and no ``model_spec`` saved, or weights
                that do not fit the architecture.
        """
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(
                f"{directory}: no such folder (expected a ProtectResult.save folder)"
            )
        if not directory.is_dir():
            raise NotADirectoryError(
                f"{directory}: is a file; expected a folder holding {cls.META} and {cls.WEIGHTS}"
            )
        meta = _read_result_json(directory / cls.META)
        weights_path = directory / cls.WEIGHTS
        shapes = _weight_shapes(weights_path)
        if model is None:
            spec = meta.get("model_spec")
            if not spec:
                raise ValueError(
                    f"{directory}: the saved {meta.get('model_class')} is not a zoo model (no model_spec); "
                    "pass model= an instance of its architecture"
                )
            model = _build_bounded(spec, shapes, directory / cls.META, weights_path)
        weights = _read_weights(weights_path)
        floating = {t.dtype for t in weights.values() if t.is_floating_point()}
        if len(floating) == 1:
            model = model.to(dtype=floating.pop())
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"{directory}: weights do not fit {type(model).__name__}: {error}"
            ) from None
        try:
            config = ProtectConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{directory / cls.META}: invalid config: {error}") from None
        return cls(
            model=model,
            history=meta["history"],
            config=config,
            initial_original_accuracy=meta.get("initial_original_accuracy"),
            stopped_by=meta.get("stopped_by"),
            initial_original_mse=meta.get("initial_original_mse"),
            events=list(meta.get("events") or []),
        )


def _read_result_json(path: Path) -> dict[str, Any]:
    """``result.json`` as a dict of the saved shape, or one ValueError naming the file."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected the JSON file ProtectResult.save writes")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (ProtectResult.save writes it)") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    expected = {"config": dict, "history": list}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(
                f"{path}: '{key}' should be a JSON {'object' if kind is dict else 'array'}, "
                f"got {type(meta.get(key)).__name__}"
            )
    if not isinstance(meta.get("events", []), (list, type(None))):
        raise ValueError(
            f"{path}: 'events' should be a JSON array, got {type(meta['events']).__name__}"
        )
    if not all(isinstance(record, dict) for record in meta["history"]):
        raise ValueError(f"{path}: 'history' should hold one JSON object per outer step")
    spec = meta.get("model_spec")
    if spec is not None and not (
        isinstance(spec, dict)
        and isinstance(spec.get("name"), str)
        and isinstance(spec.get("kwargs", {}), (dict, type(None)))
    ):
        raise ValueError(
            f'{path}: \'model_spec\' should be {{"name": str, "kwargs": {{...}}}}, got {spec!r}'
        )
    return meta


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (reads no tensor data)."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise ValueError(
            f"{path}: is a folder; expected the safetensors file ProtectResult.save writes"
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (ProtectResult.save writes it)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def _build_bounded(spec: dict, shapes: dict, meta_path: Path, weights_path: Path) -> nn.Module:
    """Build the zoo model ``spec`` names, after checking on the meta device that its parameters
    and buffers have exactly the shapes stored in the weights file."""
    name, kwargs = spec["name"], spec.get("kwargs")
    try:
        with torch.device("meta"):
            skeleton = build_model(name, kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as error:
        raise ValueError(f"{meta_path}: model_spec {spec!r} does not build: {error}") from None
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if wanted != shapes:
        differ = sorted(k for k in set(wanted) | set(shapes) if wanted.get(k) != shapes.get(k))
        first = differ[0]
        raise ValueError(
            f"{meta_path}: model_spec {spec!r} does not match {weights_path.name}: "
            f"{len(differ)} tensors differ, e.g. {first!r}: spec {wanted.get(first)}, "
            f"file {shapes.get(first)}"
        )
    return build_model(name, kwargs)


@dataclass
class SimulationResult:
    """What :func:`simulate` returns.

    Attributes:
        loss: () suppression loss L = sum_k n_k l_k / N (detached).
        accuracy: () fraction of evaluation samples classified correctly after each step.
        meta_grad: parameter name -> dL/dtheta, shaped like the parameter.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    meta_grad: dict[str, torch.Tensor] = field(default_factory=dict)
