"""The eager, official-style SOPHON engine: the oracle and the benchmark baseline.

It runs the algorithm of :mod:`sophon_fast.engine.inner` the way the official code runs it
through learn2learn 0.2.0, on the module itself and one tensor at a time:

- the learner is a copy of the module tree whose parameters are per-parameter ``clone()``s (a
  CloneBackward edge each) and whose buffers are *shared* with the model, so the simulation's
  train-mode forwards drift the model's BatchNorm statistics;
- every inner update is a per-parameter expression (``p - lr * g`` for SGD, as learn2learn's
  ``update_module``; the optimizer's pure-torch step from the registry,
  :mod:`sophon_fast.reference.optimizers`, per tensor for the others) written back into the
  learner's module tree;
- ALL K evaluation graphs are kept alive until one backward of sum_k n_k l_k / N;
- BatchNorm statistics are saved and restored as per-tensor copies around the simulation, and
  backups are ``copy.deepcopy`` of the whole model.

The head re-initialisation writes the new values into the clone under ``no_grad``, keeping the
clone's identity edge (see :mod:`sophon_fast.engine.inner` for what that means in order 1 and
order 2). Truncated order 2 follows the same definition as the fast engine. Both engines must
agree to rounding error; tests check it in float64.

Differences from the official code are fixes, listed in :mod:`sophon_fast.api`; in particular
``num_batches_tracked`` is saved and restored with the running statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sophon_fast.reference.optimizer_state import load_optimizer_tensors, optimizer_tensors
from sophon_fast.reference.optimizers import Adversary, get_optimizer
from sophon_fast.reference.probe import heldout_probe_r2
from sophon_fast.reference.trajectory import trajectory_weights

# loss(logits, labels) -> () (the signature of sophon_fast.losses.LossFn).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["clone_module", "load_bn", "save_bn", "simulate_reference", "update_module"]


def clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """learn2learn-style clone: new module objects, parameters ``p.clone()`` (differentiable),
    buffers shared with ``module``."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = module.__dict__.copy()
    memo[id(module)] = clone
    clone._parameters = {}
    for name, param in module._parameters.items():
        if param is None:
            clone._parameters[name] = None
        else:
            if id(param) not in memo:
                memo[id(param)] = param.clone()
            clone._parameters[name] = memo[id(param)]
    clone._buffers = dict(module._buffers)
    clone._modules = {
        name: None if child is None else clone_module(child, memo)
        for name, child in module._modules.items()
    }
    return clone


def update_module(module: nn.Module, new_params: dict[str, torch.Tensor]) -> None:
    """Replace the learner's parameters by name (dotted), one module attribute at a time."""
    for name, value in new_params.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attr] = value


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def save_bn(model: nn.Module) -> list[tuple[torch.Tensor | None, ...]]:
    """Per-tensor deep copies of every BatchNorm's running_mean, running_var, num_batches_tracked."""
    saved = []
    for bn in _bn_modules(model):
        saved.append(
            tuple(
                None if t is None else copy.deepcopy(t)
                for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            )
        )
    return saved


def load_bn(model: nn.Module, saved: list[tuple[torch.Tensor | None, ...]]) -> None:
    """Copy the saved statistics back, tensor by tensor."""
    with torch.no_grad():
        for bn, values in zip(_bn_modules(model), saved):
            for current, value in zip(
                (bn.running_mean, bn.running_var, bn.num_batches_tracked), values
            ):
                if current is not None:
                    current.copy_(value)


def _eager_update(
    adversary: Adversary, param: torch.Tensor, grad: torch.Tensor, state: dict
) -> torch.Tensor:
    """One eager per-tensor update through the optimizer's pure-torch step (the registry's
    :meth:`~sophon_fast.reference.optimizers.InnerOptimizer.step`, torch.optim semantics on a
    tensor of any shape). ``state`` (a dict, empty before the first step) is updated in place."""
    optimizer = get_optimizer(adversary.name)
    if not state:
        state.update(optimizer.init(param))
    new, new_state = optimizer.step(param, grad, state, adversary.step_hp)
    state.update(new_state)
    return new


def simulate_reference(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    adapt_masks: Sequence[torch.Tensor],
    eval_masks: Sequence[torch.Tensor],
    *,
    suppression_loss: LossFn,
    adapt_loss: LossFn,
    adversary: Adversary,
    order: int,
    truncate: int | None,
    head_values: dict[str, torch.Tensor] | None,
    restore_stats: bool = True,
    metric: LossFn | None = None,
    step_weighting: tuple[str, float] = ("uniform", 0.0),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One eager simulation on ``model`` (see :mod:`sophon_fast.engine.inner` for the maths).

    Args:
        model: the model; its parameters are the meta-parameters theta.
        batches: K pairs x (batch_k, ...), y (batch_k,).
        adapt_masks / eval_masks: K (batch_k,) bool masks.
        suppression_loss / adapt_loss: ``loss(logits, labels) -> ()``.
        adversary: the inner optimizer.
        order: 1 or 2.
        truncate: order-2 window W (None = all K steps).
        head_values: parameter name -> replacement value written into the clone, or None.
        restore_stats: restore the BatchNorm statistics afterwards (official ``load_bn``).
        metric: ``metric(outputs, targets) -> ()`` summed over the evaluation samples, divided by
            N into the accuracy; None = the number classified correctly.

    Returns:
        (loss (), accuracy (), meta-gradient name -> tensor shaped like the parameter).
    """
    names = [name for name, _ in model.named_parameters()]
    params = [param for _, param in model.named_parameters()]
    was_training = model.training
    saved_bn = save_bn(model)
    model.train()
    learner = clone_module(model)
    current = dict(learner.named_parameters(remove_duplicate=True))
    current = {name: current[name] for name in names}
    if head_values:
        with torch.no_grad():
            for name, value in head_values.items():
                current[name].copy_(value.to(current[name]))
    inner_steps = len(batches)
    window = 0 if order == 1 else (inner_steps if truncate is None else min(truncate, inner_steps))
    states: dict[str, dict] = {name: {} for name in names}
    weighted_losses, step_losses, counts = [], [], []
    correct = 0
    total_eval = 0
    for k, (x, y) in enumerate(batches):
        adapt, evaluate = adapt_masks[k].to(x.device), eval_masks[k].to(x.device)
        differentiate = k >= inner_steps - window
        adapt_error = adapt_loss(learner(x[adapt]), y[adapt])
        grads = torch.autograd.grad(adapt_error, list(current.values()), create_graph=differentiate)
        updated = {}
        for (name, param), grad in zip(current.items(), grads):
            if differentiate:
                updated[name] = _eager_update(adversary, param, grad, states[name])
            else:
                with torch.no_grad():
                    state = {key: value.detach() for key, value in states[name].items()}
                    new = _eager_update(adversary, param.detach(), grad.detach(), state)
                states[name] = state
                updated[name] = new + (param - param.detach())
        update_module(learner, updated)
        current = updated
        logits = learner(x[evaluate])
        count = int(evaluate.sum())
        step_loss = suppression_loss(logits, y[evaluate])
        weighted_losses.append(count * step_loss)
        step_losses.append(step_loss)
        counts.append(count)
        correct = correct + (
            (logits.detach().argmax(1) == y[evaluate]).sum()
            if metric is None
            else metric(logits.detach(), y[evaluate])
        )
        total_eval += count
    if step_weighting[0] == "uniform":
        loss = sum(weighted_losses) / total_eval
    else:
        weights = trajectory_weights(counts, *step_weighting)
        loss = sum(w * step_loss for w, step_loss in zip(weights, step_losses))
    grads = torch.autograd.grad(loss, params)
    if restore_stats:
        load_bn(model, saved_bn)
    model.train(was_training)
    meta_grad = {name: grad.detach() for name, grad in zip(names, grads)}
    accuracy = torch.as_tensor(correct, device=loss.device).to(loss.dtype) / total_eval
    return loss.detach(), accuracy, meta_grad


class ReferenceEngine:
    """The eager engine behind ``engine="reference"``: per-parameter Adams on the module itself,
    ``copy.deepcopy`` backups; same interface as :class:`sophon_fast.engine.inner.FastEngine`."""

    name = "reference"

    def __init__(
        self,
        model: nn.Module,
        *,
        meta_lr: float,
        ntr_lr: float,
        suppression_loss: LossFn,
        adapt_loss: LossFn,
        ntr_loss: LossFn,
        order: int,
        truncate: int | None,
        restore_bn: bool,
        step_weighting: tuple[str, float] = ("uniform", 0.0),
    ) -> None:
        self.model = model
        self.step_weighting = tuple(step_weighting)
        self.params = list(model.parameters())
        self.meta_optimizer = torch.optim.Adam(self.params, lr=meta_lr)
        self.ntr_optimizer = torch.optim.Adam(self.params, lr=ntr_lr)
        self.suppression_loss, self.adapt_loss, self.ntr_loss = (
            suppression_loss,
            adapt_loss,
            ntr_loss,
        )
        self.order, self.truncate, self.restore_bn = order, truncate, restore_bn

    def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
        return simulate_reference(
            self.model,
            batches,
            adapt_masks,
            eval_masks,
            suppression_loss=self.suppression_loss,
            adapt_loss=self.adapt_loss,
            adversary=adversary,
            order=self.order,
            truncate=self.truncate,
            head_values=head_values,
            restore_stats=self.restore_bn,
            step_weighting=self.step_weighting,
        )

    def representation_grad(self, x, y, head: str, num_classes: int, weight: float):
        """As :meth:`sophon_fast.engine.inner.FastEngine.representation_grad`, per parameter."""
        saved_bn = save_bn(self.model)
        was_training = self.model.training
        self.model.train()
        features = []
        module = dict(self.model.named_modules())[head]
        hook = module.register_forward_pre_hook(lambda _, args: features.append(args[0]))
        try:
            self.model(x)
            r2 = heldout_probe_r2(features[0].flatten(1), y, num_classes)
            # before the statistics are restored: BatchNorm's backward checks they are unchanged
            grads = torch.autograd.grad(r2, list(self.model.parameters()), allow_unused=True)
        finally:
            hook.remove()
            load_bn(self.model, saved_bn)
            self.model.train(was_training)
        names = [name for name, _ in self.model.named_parameters()]
        out = {
            name: (torch.zeros_like(p) if g is None else g.detach()) * weight
            for name, p, g in zip(names, self.model.parameters(), grads)
        }
        return r2.detach(), out

    def meta_step(self, meta_grad: dict[str, torch.Tensor], max_grad_norm: float | None) -> None:
        for name, param in self.model.named_parameters():
            param.grad = meta_grad[name].to(param.dtype)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    def ntr_step(self, x: torch.Tensor, y: torch.Tensor, reduce=None) -> torch.Tensor:
        """One NTR step; ``reduce`` as in :meth:`sophon_fast.engine.inner.FastEngine.ntr_step`."""
        self.model.train()
        self.ntr_optimizer.zero_grad(set_to_none=True)
        loss = self.ntr_loss(self.model(x), y)
        loss.backward()
        if reduce is not None:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            grads, loss = reduce(grads, loss)
            for param, grad in zip(self.params, grads):
                param.grad = grad
        self.ntr_optimizer.step()
        self.ntr_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def count_correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        correct = (self.model(x).argmax(1) == y).sum()
        self.model.train()
        return correct

    def backup(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def restore(self, backup: nn.Module) -> None:
        with torch.no_grad():
            for current, saved in zip(
                self.model.state_dict().values(), backup.state_dict().values()
            ):
                current.copy_(saved)

    def named_grad(self, meta_grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(meta_grad)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update(optimizer_tensors(self.meta_optimizer, "meta_adam"))
        out.update(optimizer_tensors(self.ntr_optimizer, "ntr_adam"))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(state, strict=True)
        load_optimizer_tensors(self.meta_optimizer, tensors, "meta_adam")
        load_optimizer_tensors(self.ntr_optimizer, tensors, "ntr_adam")

    def export(self) -> nn.Module:
        return self.model
