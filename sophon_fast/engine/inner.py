"""Fine-tuning simulation (FTS) + evaluation (FTE) on flat parameters: the fast engine's core.

One simulation, for restricted batches k = 1..K (K = ``inner_steps``), adversary U (an inner
optimizer, :mod:`sophon_fast.engine.optimizers`), adapt split a_k and evaluate split e_k:

    phi_0 = theta  (head slice replaced by fresh values when the head is re-drawn)
    phi_k = U(phi_{k-1}, grad CE(f(phi_{k-1}; x_{a_k}), y_{a_k}))          # train-mode BN
    l_k   = suppression_loss(f(phi_k; x_{e_k}), y_{e_k})                  # train-mode BN
    L     = sum_k n_k l_k / N,     n_k = |e_k|, N = sum_k n_k

Meta-gradient:

- **order 1** (official, FOMAML along the trajectory): the inner gradients are constants, so
  d phi_k / d theta = I and dL/dtheta = sum_k (n_k/N) grad l_k(phi_k). Each l_k is
  back-propagated right after step k into a flat accumulator (float32, float64 for float64
  parameters): one evaluation graph alive at a time instead of K. The inner updates run in place
  on phi and the optimizer state (no old value is needed once its adaptation graph is freed).
- **order 2** (exact): the inner gradients of the differentiated steps are built with
  ``create_graph=True`` and dL/dtheta is one backward through the whole trajectory
  (Hessian-vector products through every inner update, for every inner optimizer).
  **Truncation** ``truncate=W``: only the last W inner steps (k > K - W) are differentiated.
  Steps 1..K-W are first-order steps, exactly as in order 1: their update
  phi_k - phi_{k-1} (inner gradient, optimizer state, weight decay, everything) is a constant,
  so d phi_k / d phi_{k-1} = I. W = K (``truncate=None``) is full order 2; W = 0 equals order 1
  (tests check both ends).

**Head re-initialisation** (ICE runs): phi_0's head slice is overwritten, without recording the
write, in a clone of theta, just as the official code re-initialises learn2learn's clone in
place. The clone's identity edge survives, so the real head receives meta-gradient although its
value is never read by the simulation (order 1: the sum of the head gradients at phi_1..phi_K;
order 2: the derivative with respect to the *re-drawn* head values, routed to theta's head).
The exact derivative with respect to theta's head would be 0; NTR repairs the head on the
original domain either way.

**BatchNorm statistics**: the simulation runs on a scratch copy of the running-statistics buffer
(one copy), so the model's statistics are untouched; with ``keep_stats=True`` the drifted
statistics are copied back (the official behaviour without ``load_bn``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sophon_fast.engine import options as engine_options
from sophon_fast.engine import vmap as vmap_path
from sophon_fast.engine.checkpoint import load_optimizer_tensors, optimizer_tensors
from sophon_fast.engine.flat import FlatParams
from sophon_fast.engine.functional import FunctionalModel, to_channels_last
from sophon_fast.engine.graphs import (
    AutocastModel,
    GraphCache,
    GraphedInnerStep,
    GraphedSimulation,
    precision,
)
from sophon_fast.engine.optimizers import (
    Adversary,
    init_state,
    inner_step,
    inner_step_,
    state_dtype,
)
from sophon_fast.engine.sampling import masks_to_indices
from sophon_fast.losses import LossFn
from sophon_fast.nn import convert_batchnorm, fuse_bn_relu_pool, fuse_relu_pool
from sophon_fast.ops.flat_accumulate import flat_accumulate_
from sophon_fast.ops.flat_adam import flat_clip_adam_step_
from sophon_fast.reference.probe import heldout_probe_r2
from sophon_fast.reference.trajectory import trajectory_weights

__all__ = ["FlatSimulation", "simulate_flat", "to_channels_last"]


@dataclass
class FlatSimulation:
    """Result of one simulation on flat parameters.

    Attributes:
        loss: () suppression loss L (detached).
        accuracy: () fraction of evaluation samples classified correctly at phi_1..phi_K.
        meta_grad: (n_params,) dL/dtheta.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    meta_grad: torch.Tensor


def _window_start(inner_steps: int, order: int, truncate: int | None) -> int:
    """First 0-based inner step whose inner gradient is differentiated."""
    if order == 1:
        return inner_steps
    window = inner_steps if truncate is None else min(truncate, inner_steps)
    return inner_steps - window


class _FlatRun:
    """One simulation's inputs and running totals; :func:`simulate_flat` drives it through
    :meth:`first_order` or :meth:`second_order` (see the module docstring for the maths)."""

    def __init__(
        self, fmodel, flat, batches, adapt_index, eval_index, *, suppression_loss, adapt_loss,
        adversary, head_values, channels_last, metric, step_weighting=("uniform", 0.0),
    ) -> None:  # fmt: skip
        self.fmodel, self.layout, self.batches = fmodel, flat.layout, batches
        self.adapt_index, self.eval_index = adapt_index, eval_index
        self.suppression_loss, self.adapt_loss = suppression_loss, adapt_loss
        self.adversary, self.head_values = adversary, head_values
        self.channels_last, self.metric = channels_last, metric
        self.theta = flat.params.detach()
        self.stats, self.counters = flat.stats.clone(), flat.counters.clone()
        eval_counts = [int(index.numel()) for index in eval_index]
        self.total_eval = sum(eval_counts)
        self.weights = trajectory_weights(eval_counts, *step_weighting)
        self.dtype = state_dtype(self.theta.dtype)
        device = self.theta.device
        self.loss_total = torch.zeros((), dtype=self.dtype, device=device)
        self.correct = torch.zeros(
            (), dtype=torch.int64 if metric is None else self.dtype, device=device
        )

    def rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        picked = x.index_select(0, index)
        return to_channels_last(picked) if self.channels_last else picked

    def start_point(self, source: torch.Tensor) -> torch.Tensor:
        phi = source.clone()
        if self.head_values:
            with torch.no_grad():  # unrecorded write: the clone's identity edge to theta survives
                for name, value in self.head_values.items():
                    phi[self.layout.param_slice(name)] = value.reshape(-1).to(phi)
        return phi

    def adapt_grad(self, k, phi, x, y, create_graph: bool = False) -> torch.Tensor:
        """Gradient of the adaptation loss of step k at ``phi``."""
        a = self.adapt_index[k]
        logits = self.fmodel(phi, self.stats, self.counters, self.rows(x, a), train=True)
        loss = self.adapt_loss(logits, y.index_select(0, a))
        return torch.autograd.grad(loss, phi, create_graph=create_graph)[0]

    def evaluate(self, k, phi, x, y) -> torch.Tensor:
        """Suppression loss l_k at ``phi`` (with its graph); adds it and the metric to the totals."""
        e = self.eval_index[k]
        y_eval = y.index_select(0, e)
        eval_logits = self.fmodel(phi, self.stats, self.counters, self.rows(x, e), train=True)
        step_loss = self.suppression_loss(eval_logits, y_eval)
        self.loss_total += self.weights[k] * step_loss.detach().to(self.dtype)
        self.correct += (
            (eval_logits.detach().argmax(1) == y_eval).sum()
            if self.metric is None
            else self.metric(eval_logits.detach(), y_eval).to(self.dtype)
        )
        return step_loss

    def first_order(self) -> torch.Tensor:
        """Order 1: in-place inner steps, each l_k back-propagated into a flat accumulator."""
        meta_grad = torch.zeros(self.theta.shape, dtype=self.dtype, device=self.theta.device)
        phi = self.start_point(self.theta)
        state = init_state(self.adversary.name, phi)
        for k, (x, y) in enumerate(self.batches):
            phi = phi.detach().requires_grad_(True)
            grad = self.adapt_grad(k, phi, x, y)
            inner_step_(self.adversary, phi, grad, state)  # the adaptation graph is already freed
            (step_grad,) = torch.autograd.grad(self.evaluate(k, phi, x, y), phi)
            flat_accumulate_(meta_grad, step_grad.contiguous(), self.weights[k])
        return meta_grad

    def second_order(self, first_differentiated: int) -> torch.Tensor:
        """Order 2: one backward through the differentiated window; the steps before
        ``first_differentiated`` are first-order steps (identity Jacobian), so, as in order 1,
        each of their l_k is back-propagated right away into a flat accumulator and its graph
        freed: memory grows with the window W, not with K."""
        theta = self.theta
        theta_leaf = theta.clone().requires_grad_(True)
        start = self.start_point(theta_leaf)
        meta_grad = torch.zeros(theta.shape, dtype=self.dtype, device=theta.device)
        phi = start.detach()
        state = init_state(self.adversary.name, phi)
        for k in range(first_differentiated):
            x, y = self.batches[k]
            phi = phi.detach().requires_grad_(True)
            grad = self.adapt_grad(k, phi, x, y)
            with torch.no_grad():
                new, state = inner_step(self.adversary, phi.detach(), grad, state)
            phi = new.requires_grad_(True)  # d phi_k / d theta = I: l_k's gradient is its own
            (step_grad,) = torch.autograd.grad(self.evaluate(k, phi, x, y), phi)
            flat_accumulate_(meta_grad, step_grad.contiguous(), self.weights[k])
        if first_differentiated >= len(self.batches):
            return meta_grad
        # phi_w's value exactly (start - start is 0) with the identity edge back to theta
        phi = phi.detach() + (start - start.detach())
        objective = torch.zeros((), dtype=theta.dtype, device=theta.device)
        for k in range(first_differentiated, len(self.batches)):
            x, y = self.batches[k]
            grad = self.adapt_grad(k, phi, x, y, create_graph=True)
            phi, state = inner_step(self.adversary, phi, grad, state)
            objective = objective + self.weights[k] * self.evaluate(k, phi, x, y)
        (window_grad,) = torch.autograd.grad(objective, theta_leaf)
        return meta_grad + window_grad.to(self.dtype)


def simulate_flat(
    fmodel: FunctionalModel,
    flat: FlatParams,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    adapt_index: Sequence[torch.Tensor],
    eval_index: Sequence[torch.Tensor],
    *,
    suppression_loss: LossFn,
    adapt_loss: LossFn,
    adversary: Adversary,
    order: int,
    truncate: int | None,
    head_values: dict[str, torch.Tensor] | None,
    keep_stats: bool = False,
    channels_last: bool = False,
    metric: LossFn | None = None,
    step_weighting: tuple[str, float] = ("uniform", 0.0),
) -> FlatSimulation:
    """Run one simulation of ``adversary`` from ``flat.params`` (see the module docstring).

    Args:
        fmodel: functional forward of the model.
        flat: current parameters / statistics; not modified (unless ``keep_stats``).
        batches: K pairs x (batch_k, ...), y (batch_k,) on the parameters' device.
        adapt_index / eval_index: K int64 index tensors into each batch (device).
        suppression_loss / adapt_loss: ``loss(logits, labels) -> ()``.
        adversary: the inner optimizer.
        order: 1 or 2.
        truncate: order-2 window W (None = all K steps).
        head_values: parameter name -> replacement value for phi_0, or None.
        keep_stats: copy the drifted BatchNorm statistics back into ``flat``.
        channels_last: hand 4-D inputs to the model in NHWC (explicit strides, so a
            one-channel input too): 1.3-1.4x per first-order step on the CPU for a BN CNN.
        metric: ``metric(outputs, targets) -> ()`` summed over the evaluation samples and divided
            by N into ``accuracy``; None = the number classified correctly (generation mode
            passes the denoising-error sum, :mod:`sophon_fast.engine.generation`).
        step_weighting: ``(weighting, rate)`` of the per-step suppression weights
            (:mod:`sophon_fast.reference.trajectory`); the default is the official average.

    Returns:
        :class:`FlatSimulation`.
    """
    run = _FlatRun(
        fmodel, flat, batches, adapt_index, eval_index, suppression_loss=suppression_loss,
        adapt_loss=adapt_loss, adversary=adversary, head_values=head_values,
        channels_last=channels_last, metric=metric, step_weighting=step_weighting,
    )  # fmt: skip
    if order == 1:
        meta_grad = run.first_order()
    else:
        meta_grad = run.second_order(_window_start(len(batches), order, truncate))
    if keep_stats:
        with torch.no_grad():
            flat.stats.copy_(run.stats)
            flat.counters.copy_(run.counters)
    accuracy = run.correct.to(run.dtype) / run.total_eval
    return FlatSimulation(run.loss_total, accuracy, meta_grad)


class FastEngine:
    """The flat-parameter engine behind ``engine="fast"``: the state of a protection run.

    Holds the model's FlatParams (the parameters are one leaf tensor the two outer Adams step),
    the functional forward and both Adam optimizers; the outer loop
    (:mod:`sophon_fast.engine.outer`) drives it through the engine interface documented there.
    """

    name = "fast"

    def __init__(
        self,
        model,
        *,
        meta_lr: float,
        ntr_lr: float,
        suppression_loss: LossFn,
        adapt_loss: LossFn,
        ntr_loss: LossFn,
        order: int,
        truncate: int | None,
        restore_bn: bool,
        options=None,
        step_weighting: tuple[str, float] = ("uniform", 0.0),
    ) -> None:
        self.model = model
        self.step_weighting = tuple(step_weighting)
        self.flat = FlatParams.from_module(model)
        self.flat.params.requires_grad_(True)
        self.options = engine_options.resolve_options(options, order=order)
        engine_options.check_device(self.options, self.flat.params.device)
        self.resolved = self.options.resolved(order, self.flat.params.device)
        self.fmodel = FunctionalModel(self._forward_module(model), self.flat.layout)
        if self.resolved["autocast"] == "bf16":
            self.fmodel = AutocastModel(self.fmodel)
        self._graphs = GraphCache()  # key -> GraphedInnerStep / GraphedSimulation / None
        fused = True if self.flat.params.is_cuda else None  # one kernel per Adam step on GPUs
        self.meta_optimizer = torch.optim.Adam([self.flat.params], lr=meta_lr, fused=fused)
        self.ntr_optimizer = torch.optim.Adam([self.flat.params], lr=ntr_lr, fused=fused)
        self.suppression_loss, self.adapt_loss, self.ntr_loss = (
            suppression_loss,
            adapt_loss,
            ntr_loss,
        )
        self.order, self.truncate, self.restore_bn = order, truncate, restore_bn

    @property
    def device(self) -> torch.device:
        return self.flat.params.device

    def _forward_module(self, model):
        """The module the functional forward runs: ``model`` itself, or a private copy whose
        BatchNorm layers are fused modules (same parameter / buffer names, so the flat layout
        fits; the user's model class is never changed)."""
        fused_bn = self.resolved["fused_batchnorm"]
        fused_pool = self.resolved["fused_bn_relu_pool"]
        fused_relu_pool = self.resolved["fused_relu_pool"]
        if not (fused_bn or fused_pool or fused_relu_pool):
            return model
        private = copy.deepcopy(model)
        if fused_pool:
            private = fuse_bn_relu_pool(private)
        if fused_bn:
            private = convert_batchnorm(private)
        if fused_relu_pool:
            private = fuse_relu_pool(private)
        if [type(m) for m in private.modules()] == [type(m) for m in model.modules()]:
            return model  # nothing to fuse (no BatchNorm): no second copy of the weights
        return private

    def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
        """One simulation -> (loss (), accuracy (), meta-gradient (n_params,))."""
        adapt_index = [masks_to_indices(m, self.device) for m in adapt_masks]
        eval_index = [masks_to_indices(m, self.device) for m in eval_masks]
        with precision(self.resolved["autocast"]):
            if self.resolved["cuda_graphs"] != "off":
                graphed = self._simulate_graphed(
                    batches, adapt_index, eval_index, head_values, adversary
                )
                if graphed is not None:
                    return graphed
            return self._simulate_eager(batches, adapt_index, eval_index, head_values, adversary)

    def _simulate_eager(self, batches, adapt_index, eval_index, head_values, adversary):
        result = simulate_flat(
            self.fmodel,
            self.flat,
            batches,
            adapt_index,
            eval_index,
            suppression_loss=self.suppression_loss,
            adapt_loss=self.adapt_loss,
            adversary=adversary,
            order=self.order,
            truncate=self.truncate,
            head_values=head_values,
            keep_stats=not self.restore_bn,
            channels_last=self.resolved["channels_last"],
            step_weighting=self.step_weighting,
        )
        return result.loss, result.accuracy, result.meta_grad

    def simulate_many(self, batches, adapt_masks, eval_masks, head_values, adversaries):
        """Several adversaries on one draw -> [(loss, accuracy, meta_grad)] in adversary order:
        one torch.func.vmap pass where :func:`sophon_fast.engine.vmap.why_not_vmap` allows it
        (option ``vmap_adversaries``), else one simulation after the other."""
        wanted = self.resolved["vmap_adversaries"]
        reason = vmap_path.why_not_vmap(self.flat, adversaries, self.order, self.truncate)
        if reason is None and (self.resolved["cuda_graphs"] != "off" or self.resolved["autocast"]):
            reason = "CUDA graphs / autocast run one simulation at a time"
        if wanted is not False and reason is None:
            try:
                return vmap_path.simulate_vmapped(
                    self.fmodel, self.flat, batches,
                    [masks_to_indices(m, self.device) for m in adapt_masks],
                    [masks_to_indices(m, self.device) for m in eval_masks],
                    suppression_loss=self.suppression_loss, adapt_loss=self.adapt_loss,
                    adversaries=adversaries, order=self.order, head_values=head_values,
                    step_weighting=self.step_weighting,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a model vmap cannot batch: loop instead
                reason = f"vmap failed ({type(error).__name__}: {error})"
        if wanted and reason is not None and len(adversaries) > 1:
            warnings.warn(f"vmap_adversaries: simulating one at a time: {reason}", stacklevel=2)
        return [
            self.simulate(batches, adapt_masks, eval_masks, head_values, adversary)
            for adversary in adversaries
        ]

    def _simulate_graphed(self, batches, adapt_index, eval_index, head_values, adversary):
        """The simulation through a captured CUDA graph (:mod:`sophon_fast.engine.graphs`), or
        None when it cannot be captured (the caller runs it eagerly)."""
        mode = self.resolved["cuda_graphs"]
        shapes = tuple(tuple(x.shape) for x, _ in batches[:1])
        sizes = tuple(int(a.numel()) for a in adapt_index) + tuple(
            int(e.numel()) for e in eval_index
        )
        hp = repr(sorted(adversary.hp.items()))
        key = (
            mode,
            len(batches),
            shapes,
            sizes,
            adversary.name,
            adversary.lr,
            hp,
            tuple(sorted(head_values or ())),
        )
        if key not in self._graphs:
            saved = (self.flat.stats.clone(), self.flat.counters.clone())
            if (
                mode == "inner"
                and len(set(sizes[: len(batches)])) == 1
                and len(set(sizes[len(batches) :])) == 1
            ):
                x = batches[0][0]
                build = lambda: GraphedInnerStep(  # noqa: E731
                    self.fmodel, self.flat, x_shape=x.shape, x_dtype=x.dtype,
                    adapt_size=sizes[0], eval_size=sizes[-1],
                    suppression_loss=self.suppression_loss, adapt_loss=self.adapt_loss,
                    adversary=adversary, channels_last=self.resolved["channels_last"],
                    step_weighting=self.step_weighting,
                )  # fmt: skip
            elif mode == "simulation":
                build = lambda: GraphedSimulation(  # noqa: E731
                    lambda b, a, e, h: self._simulate_eager(b, a, e, h, adversary),
                    batches, adapt_index, eval_index, head_values,
                )  # fmt: skip
            else:
                build = lambda: None  # noqa: E731 - varying split sizes: not capturable
            shape = (len(batches), shapes, sizes)  # a new one frees the graphs of others
            self._graphs.capture(key, build, f"{mode} step", shape=shape)
            with torch.no_grad():  # warm-up runs must leave no trace in the statistics
                self.flat.stats.copy_(saved[0])
                self.flat.counters.copy_(saved[1])
        graph = self._graphs[key]
        if graph is None:
            return None
        if isinstance(graph, GraphedInnerStep):
            layout = self.flat.layout
            head = [(layout.param_slice(n), v.reshape(-1)) for n, v in (head_values or {}).items()]
            return graph.run(batches, adapt_index, eval_index, head, keep_stats=not self.restore_bn)
        return graph.run(batches, adapt_index, eval_index, head_values)

    def representation_grad(
        self, x: torch.Tensor, y: torch.Tensor, head: str, num_classes: int, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The representation term at the current weights -> (R^2 (), weight * dR^2/dtheta).

        R^2 is the held-out linear-probe fit of the head's input features on (x, y)
        (:func:`sophon_fast.reference.probe.heldout_probe_r2`), with train-mode BatchNorm on
        a copy of the statistics (the model's own are not touched)."""
        params = self.flat.params.detach().requires_grad_(True)
        if self.resolved["channels_last"]:
            x = to_channels_last(x)
        features = []
        module = dict(self.fmodel.module.named_modules())[head]
        hook = module.register_forward_pre_hook(lambda _, args: features.append(args[0]))
        try:
            with precision(self.resolved["autocast"]):
                self.fmodel(
                    params, self.flat.stats.clone(), self.flat.counters.clone(), x, train=True
                )
        finally:
            hook.remove()
        r2 = heldout_probe_r2(features[0].flatten(1).to(params.dtype), y, num_classes)
        (grad,) = torch.autograd.grad(r2, params)
        return r2.detach(), grad.to(state_dtype(params.dtype)) * weight

    def meta_step(self, meta_grad: torch.Tensor, max_grad_norm: float | None) -> None:
        """Clip the meta-gradient to ``max_grad_norm`` (L2) and take one meta Adam step."""
        params = self.flat.params
        if self._fused_meta_step(meta_grad.to(params.dtype), max_grad_norm):
            return
        params.grad = meta_grad.to(params.dtype)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([params], max_grad_norm)
        self.meta_optimizer.step()
        params.grad = None

    def _fused_meta_step(self, grad: torch.Tensor, max_grad_norm: float | None) -> bool:
        """Clip + Adam as one fused op on the meta optimizer's own state tensors (so checkpoints
        and torch.optim stay interchangeable); False where that state layout does not fit
        (float16/bfloat16 params keep torch.optim's same-dtype moments, amsgrad, several groups)."""
        optimizer, params = self.meta_optimizer, self.flat.params
        group = optimizer.param_groups[0]
        if (
            len(optimizer.param_groups) != 1
            or params.dtype not in (torch.float32, torch.float64)
            or group["amsgrad"]
            or group["maximize"]
            or not isinstance(group["lr"], float)
        ):
            return False
        state = optimizer.state[params]
        if not state:
            # torch.optim.Adam's layout (step on the device only when fused); a float64 step for
            # float64 params keeps the count exact as in the inner optimizers.
            on_device = bool(group.get("fused") or group.get("capturable"))
            step_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
            state["step"] = torch.zeros(
                (), dtype=step_dtype, device=params.device if on_device else "cpu"
            )
            state["exp_avg"] = torch.zeros_like(params, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(params, memory_format=torch.preserve_format)
        with torch.no_grad():
            flat_clip_adam_step_(
                params, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], state["step"],
                group["lr"], group["betas"], group["eps"], group["weight_decay"], max_grad_norm,
            )  # fmt: skip
        return True

    def ntr_step(self, x: torch.Tensor, y: torch.Tensor, reduce=None) -> torch.Tensor:
        """One normal-training step: CE on an original batch, NTR Adam, no clipping. Returns ().

        ``reduce(grads, loss) -> (grads, loss)``, when given, combines the gradient and loss
        over ranks before the step (data-parallel NTR, :mod:`sophon_fast.distributed`)."""
        params = self.flat.params
        if self.resolved["channels_last"]:
            x = to_channels_last(x)
        with precision(self.resolved["autocast"]):
            logits = self.fmodel(params, self.flat.stats, self.flat.counters, x, train=True)
        loss = self.ntr_loss(logits, y)
        (params.grad,) = torch.autograd.grad(loss, params)
        if reduce is not None:
            (params.grad,), loss = reduce([params.grad], loss)
        self.ntr_optimizer.step()
        params.grad = None
        return loss.detach()

    @torch.no_grad()
    def count_correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """() int64 number of eval-mode predictions equal to ``y``."""
        logits = self.fmodel(
            self.flat.params.detach(), self.flat.stats, self.flat.counters, x, train=False
        )
        return (logits.argmax(1) == y).sum()

    def backup(self) -> FlatParams:
        """Weights and statistics: one copy per flat buffer."""
        return self.flat.clone()

    def restore(self, backup: FlatParams) -> None:
        self.flat.copy_from(backup)

    def named_grad(self, meta_grad: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.flat.named_params(meta_grad)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "model.params": self.flat.params.detach(),
            "model.stats": self.flat.stats,
            "model.counters": self.flat.counters,
        }
        out.update(optimizer_tensors(self.meta_optimizer, "meta_adam"))
        out.update(optimizer_tensors(self.ntr_optimizer, "ntr_adam"))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, target in (
                ("model.params", self.flat.params),
                ("model.stats", self.flat.stats),
                ("model.counters", self.flat.counters),
            ):
                if tensors[key].shape != target.shape:
                    raise ValueError(
                        f"checkpoint {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(target.shape)}"
                    )
                target.copy_(tensors[key])
        load_optimizer_tensors(self.meta_optimizer, tensors, "meta_adam")
        load_optimizer_tensors(self.ntr_optimizer, tensors, "ntr_adam")

    def export(self):
        """The model with the flat values written into its own parameters and buffers."""
        self.flat.write_to(self.model)
        return self.model
