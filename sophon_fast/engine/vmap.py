"""Several adversaries of one draw simulated in ONE pass: torch.func.vmap over stacked flat params.

With ``adversary_sampling="all"`` every outer step simulates A adversaries on the same batches and
averages their meta-gradients. The loop runs A simulations one after the other; here the A
parameter vectors are stacked into (A, n_params) and every forward, backward and inner update is
one batched call (A times fewer kernel launches and Python steps; launch-bound models on a GPU
gain up to A x; on a CPU the batched matmuls are as costly as the loop's).

Applicable when (:func:`why_not_vmap` says why not otherwise, and the engine loops):

- the model has no running statistics (no BatchNorm buffers: a batched simulation cannot update
  one shared statistics buffer per adversary) and its forward is vmap-compatible (no dropout, no
  data-dependent Python control flow);
- all adversaries run the same optimizer with the same hyper-parameters apart from ``lr``
  (the learning rates are batched; other values select code paths);
- no order-2 truncation window.

The maths is :func:`sophon_fast.engine.inner.simulate_flat`'s, with each optimizer's pure-torch
step (:meth:`sophon_fast.reference.optimizers.InnerOptimizer.step`, the formula of its fused
kernels' reference twins) and the pure-torch loss twins
(:mod:`sophon_fast.reference.losses`), which vmap can batch (the fused ops' custom Functions are
not batched). In order 2 the re-drawn head enters as theta + (head - theta), which equals the head
values to one rounding and keeps d phi_0 / d theta = I. Tests check equality with the loop in
float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import grad, grad_and_value, vmap

from sophon_fast.reference import losses as reference_losses
from sophon_fast.reference.flat_common import state_dtype
from sophon_fast.reference.optimizers import get_optimizer
from sophon_fast.reference.trajectory import trajectory_weights

__all__ = ["simulate_vmapped", "why_not_vmap"]


def why_not_vmap(flat, adversaries: Sequence, order: int, truncate: int | None) -> str | None:
    """None when :func:`simulate_vmapped` applies, else the reason in words."""
    if len(adversaries) < 2:
        return "a single adversary"
    if flat.layout.n_stats or flat.layout.n_counters:
        return (
            "the model has running statistics (BatchNorm), which a batched simulation cannot share"
        )
    first = adversaries[0]
    if any(a.name != first.name or a.hp != first.hp for a in adversaries[1:]):
        return "the adversaries differ in optimizer or hyper-parameters other than lr"
    if order == 2 and truncate is not None:
        return "order-2 truncation"
    return None


def _vmappable_loss(fn):
    """The pure-torch twin of a fused loss (same name in sophon_fast.reference.losses), else fn."""
    if getattr(fn, "__module__", "") == "sophon_fast.ops.losses":
        return getattr(reference_losses, fn.__name__, fn)
    return fn


def simulate_vmapped(
    fmodel,
    flat,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    adapt_index: Sequence[torch.Tensor],
    eval_index: Sequence[torch.Tensor],
    *,
    suppression_loss,
    adapt_loss,
    adversaries: Sequence,
    order: int,
    head_values: dict[str, torch.Tensor] | None,
    step_weighting: tuple[str, float] = ("uniform", 0.0),
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A simulations in one batched pass; returns [(loss (), accuracy (), meta_grad (n,))] * A.

    Shapes: flat.params (n_params,); stacked inside: (A, n_params).
    """
    suppression_loss, adapt_loss = _vmappable_loss(suppression_loss), _vmappable_loss(adapt_loss)
    theta = flat.params.detach()
    dtype = state_dtype(theta.dtype)
    stats, counters = flat.stats, flat.counters  # empty: why_not_vmap checked
    count = len(adversaries)
    optimizer, hp = get_optimizer(adversaries[0].name), adversaries[0].hp
    lrs = torch.tensor([a.lr for a in adversaries], dtype=dtype, device=theta.device)
    eval_counts = [int(e.numel()) for e in eval_index]
    total_eval = sum(eval_counts)
    weights = trajectory_weights(eval_counts, *step_weighting)
    delta = torch.zeros_like(theta)
    for param_name, value in (head_values or {}).items():
        where = flat.layout.param_slice(param_name)
        delta[where] = value.reshape(-1).to(theta) - theta[where]

    def adapt_fn(phi, x, y):
        return adapt_loss(fmodel(phi, stats, counters, x, train=True), y)

    def eval_fn(phi, x, y):
        logits = fmodel(phi, stats, counters, x, train=True)
        return suppression_loss(logits, y), logits

    def step_fn(phi, g, state, lr):  # the pure-torch step: vmap batches it, lr a tensor
        return optimizer.step(phi, g, state, {**hp, "lr": lr})

    def split(k):
        x, y = batches[k]
        a, e = adapt_index[k], eval_index[k]
        return (
            x.index_select(0, a),
            y.index_select(0, a),
            x.index_select(0, e),
            y.index_select(0, e),
        )

    if order == 1:
        phi0 = theta.clone()
        for param_name, value in (head_values or {}).items():
            phi0[flat.layout.param_slice(param_name)] = value.reshape(-1).to(theta)
        phi = phi0.expand(count, -1).clone()
        state = {k: v.expand(count, *v.shape).clone() for k, v in optimizer.init(phi0).items()}
        meta = torch.zeros((count, theta.numel()), dtype=dtype, device=theta.device)
        loss = torch.zeros(count, dtype=dtype, device=theta.device)
        correct = torch.zeros(count, dtype=torch.int64, device=theta.device)
        for k in range(len(batches)):
            xa, ya, xe, ye = split(k)
            g = vmap(grad(adapt_fn), in_dims=(0, None, None))(phi, xa, ya)
            phi, state = vmap(step_fn)(phi, g, state, lrs)
            phi = phi.to(theta.dtype)
            gk, (lk, logits) = vmap(grad_and_value(eval_fn, has_aux=True), in_dims=(0, None, None))(
                phi, xe, ye
            )
            meta += weights[k] * gk.to(dtype)
            loss += weights[k] * lk.to(dtype)
            correct += (logits.argmax(-1) == ye).sum(-1)
    else:

        def objective(theta_row, lr):
            phi = theta_row + delta
            state = optimizer.init(phi)
            total = torch.zeros((), dtype=theta.dtype, device=theta.device)
            right = torch.zeros((), dtype=torch.int64, device=theta.device)
            for k in range(len(batches)):
                xa, ya, xe, ye = split(k)
                g = grad(adapt_fn)(phi, xa, ya)
                phi, state = step_fn(phi, g, state, lr)
                phi = phi.to(theta.dtype)
                lk, logits = eval_fn(phi, xe, ye)
                total = total + weights[k] * lk
                right = right + (logits.argmax(-1) == ye).sum()
            return total, (total, right)

        stacked = theta.expand(count, -1)
        meta, (loss, correct) = vmap(grad(objective, has_aux=True))(stacked, lrs)
        meta, loss = meta.to(dtype), loss.to(dtype)
    accuracy = correct.to(dtype) / total_eval
    return [(loss[i].detach(), accuracy[i], meta[i].detach()) for i in range(count)]
