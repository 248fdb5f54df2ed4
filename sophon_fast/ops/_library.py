"""torch.library custom ops for the fused ops' kernel entry points, so torch.compile traces them.

Every entry point of the implementation table (:func:`sophon_fast._backend.register_op`) that an
autograd Function calls gets a custom op ``sophon_fast::<entry>`` (dots become underscores): its
schema is the entry's plus a trailing ``str backend``, its kernel is
``_backend.implementation(entry, backend)``, and a fake implementation gives the outputs' shapes,
dtypes and devices for tracing. Dynamo traces the Functions (forward and backward) and keeps each
custom op as one graph node, so a model calling the fused ops compiles without graph breaks.

:func:`call` is how the Functions run an entry point: eagerly it calls the implementation itself,
under torch.compile the custom op. Custom-op dispatch costs ~34 us a call on the CPU (a (2, 2, 2,
2) batch_norm forward: 42 us against 8 us called directly, this machine's 2-core Xeon), as much as
a whole fused loss at (150, 10), so eager code keeps the direct call.

A custom op may not return a tensor aliasing an input or another output (flat_sgd_step's
backward returns its incoming gradient itself when weight_decay is 0; the Triton batch_norm
forward returns two rows of one buffer): the kernel clones such outputs. Only the compiled path
pays for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _backend

NAMESPACE = "sophon_fast"

# entry point -> its custom op (the OpOverload, which dynamo calls as a graph node)
_OPS: dict[str, Callable] = {}


def _unaliased(result, inputs):
    """``result`` with every output tensor that shares storage with an input or an earlier
    output replaced by a copy."""
    single = isinstance(result, torch.Tensor)
    outputs = [result] if single else list(result)
    taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    for i, t in enumerate(outputs):
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage().data_ptr()
        if storage in taken:
            outputs[i] = t = t.clone()
            storage = t.untyped_storage().data_ptr()
        taken.add(storage)
    return outputs[0] if single else tuple(outputs)


def define(entry: str, schema: str, fake: Callable, *, mutates_args: tuple[str, ...] = ()) -> None:
    """Register the custom op of table entry ``entry``.

    Args:
        entry: a name registered with :func:`sophon_fast._backend.register_op`.
        schema: the entry's schema without the backend, ``"(Tensor x, float eps) -> Tensor"``
            (torch.library's syntax: ``Tensor?`` optional, ``Tensor(a!)`` mutated in place).
        fake: ``fake(*inputs)`` -> empty outputs of the right shapes, dtypes and devices.
        mutates_args: the names of the arguments the kernels write in place.
    """
    arguments, returns = schema.rsplit("->", 1)
    full_schema = f"{arguments.rstrip()[:-1]}, str backend) -> {returns.strip()}"

    def kernel(*args):
        *inputs, backend = args
        return _unaliased(_backend.implementation(entry, backend)(*inputs), inputs)

    def fake_kernel(*args):
        return fake(*args[:-1])

    op = torch.library.custom_op(
        f"{NAMESPACE}::{entry.replace('.', '_')}",
        kernel,
        mutates_args=mutates_args,
        schema=full_schema,
    )
    op.register_fake(fake_kernel)
    _OPS[entry] = op._opoverload


def call(entry: str, backend: str, *inputs):
    """Run table entry ``entry`` on ``backend``: the implementation itself eagerly, its custom op
    while torch.compile traces."""
    if torch.compiler.is_compiling():
        return _OPS[entry](*inputs, backend)
    return _backend.implementation(entry, backend)(*inputs)
