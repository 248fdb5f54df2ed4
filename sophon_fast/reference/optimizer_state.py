"""A torch optimizer's state as named tensors, and back: what a checkpoint stores of it.

``{prefix}.{param_index}.{key}`` names each state tensor (``exp_avg``, ``step``, ...) of the
optimizer's parameters in ``param_groups`` order, so the reference engine, the fast engine and the
checkpoint writer (:mod:`sophon_fast.engine.checkpoint`, which re-exports both functions) save and
restore Adam states the same way. Kept at this layer so that the reference engine needs nothing
above it.
"""

from __future__ import annotations

import torch

__all__ = ["load_optimizer_tensors", "optimizer_tensors"]


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}.{param_index}.{key}`` -> state tensor, for every parameter with state."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            out[f"{prefix}.{index}.{key}"] = value
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str
) -> None:
    """Inverse of :func:`optimizer_tensors`; state tensors go to their parameter's device, except a
    non-capturable ``step`` that torch keeps on the CPU."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_device_step = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    optimizer.state.clear()
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        index, key = name[len(prefix) + 1 :].split(".", 1)
        param = params[int(index)]
        if key == "step" and not on_device_step:
            value = value.clone()
        else:
            value = value.to(param.device).clone()
        optimizer.state.setdefault(param, {})[key] = value
