"""The outer SOPHON loop shared by both engines: suppression, NTR, guard, evaluation, checkpoints.

One outer step (official order):

1. back up weights and statistics (engine-specific: one flat copy, or ``copy.deepcopy``);
2. ``suppression_steps`` times: draw a simulation (:mod:`sophon_fast.engine.sampling`), run it
   (for every drawn adversary; several are averaged), clip the meta-gradient to
   ``max_grad_norm`` and take one meta Adam step (lr alpha * base_lr);
3. ``ntr_steps`` times: CE on an original batch and one NTR Adam step (lr beta * base_lr, its
   own Adam state, no clipping);
4. every ``eval_every`` outer steps: original-domain accuracy on the evaluation data, then the
   intactness guard: at accuracy <= threshold, restore the backup and stop (official) or go on;
5. record history, call callbacks (True stops), write a checkpoint when due.

All randomness is drawn here from one seeded generator and handed to the engine, so the fast and
reference engines see the same batches, splits, head values and adversaries.

Engine interface (``FastEngine``, ``ReferenceEngine``): ``simulate(batches, adapt_masks,
eval_masks, head_values, adversary) -> (loss, accuracy, grad)``, ``meta_step(grad,
max_grad_norm)``, ``ntr_step(x, y) -> loss``, ``count_correct(x, y)``, ``backup()``,
``restore(backup)``, ``state_tensors()``, ``load_state_tensors(tensors)``, ``export()``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sophon_fast.engine.sampling import EpochSampler, draw_simulation

__all__ = ["ProtectionRun", "average_results"]


def average_results(results: Sequence[tuple[torch.Tensor, torch.Tensor, Any]]):
    """Mean loss, accuracy and meta-gradient (flat tensor or name -> tensor dict) of several runs."""
    if len(results) == 1:
        return results[0]
    count = len(results)
    loss = sum(r[0] for r in results) / count
    accuracy = sum(r[1] for r in results) / count
    grads = [r[2] for r in results]
    if isinstance(grads[0], dict):
        grad = {name: sum(g[name] for g in grads) / count for name in grads[0]}
    else:
        grad = sum(grads) / count
    return loss, accuracy, grad


@dataclass
class ProtectionRun:
    """State of one protection run over an engine. Data tensors live on the engine's device.

    Attributes:
        engine: FastEngine or ReferenceEngine.
        config: the validated ProtectConfig.
        restricted / original / original_eval: (images, labels) pairs.
        head: (name, nn.Linear) of the head to re-draw in every simulation, or None.
    """

    engine: Any
    config: Any
    restricted: tuple[torch.Tensor, torch.Tensor]
    original: tuple[torch.Tensor, torch.Tensor]
    original_eval: tuple[torch.Tensor, torch.Tensor] | None
    head: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    stopped_by: str | None = None
    initial_original_accuracy: float | None = None
    dist: Any = None  # sophon_fast.distributed.DistributedContext under a process group, else None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.restricted_sampler = EpochSampler(self.restricted[1].shape[0], self.generator)
        self.original_sampler = EpochSampler(self.original[1].shape[0], self.generator)

    # ------------------------------------------------------------------ evaluation
    def original_accuracy(self) -> float:
        """Eval-mode accuracy (percent) on the original evaluation data."""
        x, y = self.original_eval
        size = self.config.eval_batch_size
        correct = sum(
            self.engine.count_correct(x[i : i + size], y[i : i + size])
            for i in range(0, y.shape[0], size)
        )
        return 100.0 * float(correct) / y.shape[0]

    def guard_threshold(self) -> float | None:
        """Absolute accuracy (percent) at or below which the guard fires; None when off."""
        cfg = self.config
        if cfg.guard_threshold is None or not cfg.eval_every or self.original_eval is None:
            return None
        if cfg.guard_mode == "absolute":
            return cfg.guard_threshold
        return cfg.guard_threshold * self.initial_original_accuracy

    def start(self) -> None:
        """Measure the starting original accuracy (needed by the relative guard; recorded)."""
        if self.dist is not None:
            self.dist.prepare(self)  # same config/state on every rank; rank 0's weights everywhere
        if (
            self.config.eval_every
            and self.original_eval is not None
            and self.initial_original_accuracy is None
        ):
            self.initial_original_accuracy = self.original_accuracy()

    # ------------------------------------------------------------------ one outer step
    def outer_step(self) -> dict[str, Any]:
        cfg, engine = self.config, self.engine
        started = time.perf_counter()
        backup = engine.backup()
        suppression_losses, restricted_accuracies, adversaries = [], [], []

        def next_draw():
            return draw_simulation(
                images=self.restricted[0],
                labels=self.restricted[1],
                sampler=self.restricted_sampler,
                generator=self.generator,
                inner_steps=cfg.inner_steps,
                batch_size=cfg.batch_size,
                adapt_size=cfg.adapt_size,
                head=self.head,
                adversaries=cfg.adversaries,
                sample_one=cfg.adversary_sampling == "one",
            )

        simulations = getattr(cfg, "simulations", 1)
        if self.dist is not None:
            self.dist.step = self.step
        for _ in range(cfg.suppression_steps):
            if self.dist is not None:  # this rank's share of the draws, averaged over all ranks
                loss, accuracy, grad, drawn = self.dist.simulate(engine, next_draw, simulations)
            else:
                results, drawn = [], []
                for _ in range(simulations):
                    draw = next_draw()
                    drawn.extend(draw.adversaries)
                    if len(draw.adversaries) > 1 and hasattr(engine, "simulate_many"):
                        results.extend(  # all adversaries of the draw in one vmap pass
                            engine.simulate_many(
                                draw.batches,
                                draw.adapt_masks,
                                draw.eval_masks,
                                draw.head_values,
                                draw.adversaries,
                            )
                        )
                    else:
                        results.extend(
                            engine.simulate(
                                draw.batches,
                                draw.adapt_masks,
                                draw.eval_masks,
                                draw.head_values,
                                adversary,
                            )
                            for adversary in draw.adversaries
                        )
                    del draw
                loss, accuracy, grad = average_results(results)
            engine.meta_step(grad, cfg.max_grad_norm)
            suppression_losses.append(loss)
            restricted_accuracies.append(accuracy)
            adversaries.extend(a.describe() for a in drawn)
        ntr_losses = []
        for _ in range(cfg.ntr_steps):
            index = self.original_sampler.next(cfg.batch_size).to(self.original[0].device)
            ntr_step = engine.ntr_step if self.dist is None else self.dist.ntr_for(engine)
            ntr_losses.append(
                ntr_step(
                    self.original[0].index_select(0, index), self.original[1].index_select(0, index)
                )
            )
        if self.dist is not None:
            self.dist.sync_statistics(engine)  # BatchNorm rule: sophon_fast.distributed
        self.step += 1
        original_accuracy = None
        if cfg.eval_every and self.original_eval is not None and self.step % cfg.eval_every == 0:
            original_accuracy = self.original_accuracy()
        guard = None
        threshold = self.guard_threshold()
        if (
            original_accuracy is not None
            and threshold is not None
            and original_accuracy <= threshold
        ):
            engine.restore(backup)
            guard = "rollback_stop" if cfg.guard_action == "stop" else "rollback_continue"
            if cfg.guard_action == "stop":
                self.stopped_by = "guard"

        def mean(values):
            return (
                None
                if not values
                else float(torch.stack([v.detach().double() for v in values]).mean())
            )

        record = {
            "step": self.step,
            "suppression_loss": mean(suppression_losses),
            "restricted_accuracy": None
            if not restricted_accuracies
            else 100.0 * mean(restricted_accuracies),
            "ntr_loss": mean(ntr_losses),
            "original_accuracy": original_accuracy,
            "adversaries": adversaries,
            "guard": guard,
            "seconds": time.perf_counter() - started,
        }
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        outer_steps: int,
        *,
        progress: bool = True,
        callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        """Run outer steps until ``outer_steps`` in total, a guard stop or a callback's True."""
        if self.stopped_by == "guard":
            warnings.warn(
                "the run was stopped by the intactness guard; nothing left to resume", stacklevel=3
            )
            return
        self.stopped_by = None
        from tqdm.auto import tqdm

        bar = tqdm(
            total=outer_steps, initial=self.step, disable=not progress, desc="protect", unit="step"
        )
        try:
            while self.step < outer_steps:
                record = self.outer_step()
                bar.update(1)
                bar.set_postfix(
                    {
                        k: f"{record[k]:.4g}"
                        for k in ("suppression_loss", "ntr_loss", "original_accuracy")
                        if record[k] is not None
                    }
                )
                for callback in callbacks:
                    if callback(record) is True:
                        self.stopped_by = self.stopped_by or "callback"
                if self.dist is not None:  # a stop on any rank stops every rank
                    self.stopped_by = self.dist.agree_stop(self.stopped_by)
                due = checkpoint_every and self.step % checkpoint_every == 0
                if checkpoint is not None and (due or self.stopped_by or self.step == outer_steps):
                    checkpoint()
                if self.stopped_by:
                    break
        finally:
            bar.close()

    # ------------------------------------------------------------------ checkpoint state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"engine.{k}": v for k, v in self.engine.state_tensors().items()}
        tensors.update(self.restricted_sampler.state_tensors("sampler.restricted"))
        tensors.update(self.original_sampler.state_tensors("sampler.original"))
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.restricted[0].is_cuda:
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.restricted[0].device)
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "stopped_by": self.stopped_by,
            "initial_original_accuracy": self.initial_original_accuracy,
            "history": self.history,
            "engine": self.engine.name,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["engine"] != self.engine.name:
            raise ValueError(
                f"checkpoint was written by engine={meta['engine']!r}, this run uses {self.engine.name!r}"
            )
        prefix = "engine."
        self.engine.load_state_tensors(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        self.restricted_sampler.load_state_tensors(tensors, "sampler.restricted")
        self.original_sampler.load_state_tensors(tensors, "sampler.original")
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if "rng.torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"], self.restricted[0].device)
        self.step = int(meta["step"])
        self.stopped_by = meta["stopped_by"]
        self.initial_original_accuracy = meta["initial_original_accuracy"]
        self.history = list(meta["history"])
