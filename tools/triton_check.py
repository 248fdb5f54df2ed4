"""triton_check: compile every Triton kernel of sophon_fast for sm_80 and sm_90, without a GPU.

Tests run the kernels under Triton's interpreter on CPU tensors, which never specialises an
argument: a kernel that cannot compile for a GPU (``n_cols.to(tl.float32)`` when ``n_cols`` is 1
and therefore a compile-time constant) passes every CPU test. This tool closes that gap:

1. record: every public op that has a Triton path runs on CPU tensors under the forced ``triton``
   backend (:data:`CASES`: fp16/bf16/fp32/fp64, one element, one row, one class, odd sizes,
   16-divisible sizes, unaligned buffers, 70,000 classes); ``SOPHON_FAST_TRITON_PLAN=gpu`` makes
   the launchers size their launches for a GPU (blocks, warps) although the kernels run under
   the interpreter; the hook of :func:`sophon_fast.ops._triton.launch_hook` sees each launch
   ``kernel[grid](*args, **kwargs)`` exactly as the launcher made it, then the interpreter runs
   it so the op completes (a launch of more than 64 programs is recorded but not run: ~4 ms a
   program interpreted);
2. specialise: each launch goes through Triton's own binder for the nvidia backend (the code
   ``JITFunction.run`` uses: a Python float is fp32, an int equal to 1 becomes a constant,
   16-divisible ints and 16-byte-aligned pointers get ``tt.divisibility``), so the signature,
   constants and attributes are the ones a GPU run would compile; duplicates are dropped;
3. compile: ``triton.compile`` down to a cubin for ``GPUTarget("cuda", 80, 32)`` and
   ``("cuda", 90, 32)`` with the wheel's ptxas, over ``--jobs`` processes; ptxas's ``-v`` log
   gives each kernel's registers and spills.

It exits 1 on any compile error (kernel, launch arguments and the error are printed) and on any
register spill unless ``--allow-spills`` (a spilled kernel works from local memory: every kernel
here is memory-bound and a spill adds traffic on top of the bytes the op is designed around), and
2 when a ``@jit`` function of the package was neither launched nor called from a launched kernel. Everything it writes (the
Triton cache, ptxas temporaries) stays under ``build/triton-check``.

    python tools/triton_check.py [--jobs 2] [--arch 80 90] [--list] [--allow-spills]

Works with triton 3.6 and 3.8 (both expose the binder, ``_pack_args`` and ``ASTSource`` used here).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import math
import multiprocessing
import os
import re
import resource
import sys
import textwrap
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "triton-check"
_WORKER_FLAG = "SOPHON_FAST_TRITON_CHECK_WORKER"
if os.environ.get(_WORKER_FLAG) == "1":
    # A compile worker: under TRITON_INTERPRET=1 triton.language's own @jit functions (tl.sum,
    # tl.max) are interpreter objects, which the code generator cannot compile.
    os.environ.pop("TRITON_INTERPRET", None)
else:
    # Recording: the package's kernels must be interpreter wrappers (they run on CPU tensors)
    # whatever device this machine has, while the launchers size their launches for a GPU (what
    # the GPU compiles); both set before sophon_fast is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SOPHON_FAST_TRITON_PLAN"] = "gpu"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import sophon_fast as sf  # noqa: E402
from sophon_fast.ops import _triton  # noqa: E402
from sophon_fast.ops import flat_optim as _flat_optim  # noqa: E402

ARCHS = (80, 90)


# ----------------------------------------------------------------------------------------- cases
# Specialisations multiply: 4 dtypes x 3 size classes x alignment x every flag combination made
# ~800 compilations per target (over 20 minutes on 2 cores). The cases cover each axis against one
# default of the others instead: every flag combination the launchers produce at float32 and a
# 16-divisible size; every dtype at that size; 1 element (the int becomes a constant) at float32
# and float64 (the kernels' COMPUTE_F64 branch converts sizes separately); 7 elements one element
# into a buffer at float32 (a plain i32 and pointers without divisibility: nothing specialised).
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)


def _flat_configs(n_variants: int):
    """(dtype, n, unaligned, variant) of the flat-buffer ops, per the rule above."""
    for variant in range(n_variants):
        yield F32, 1024, False, variant
    for dtype in (F16, BF16, F64):
        yield dtype, 1024, False, 0
    yield F32, 1, False, 0
    yield F64, 1, False, 0
    yield F32, 7, True, 0


def _flat(n: int, dtype: torch.dtype, unaligned: bool = False) -> torch.Tensor:
    """(n,) values; ``unaligned`` starts one element into a buffer (pointer % 16 != 0)."""
    if unaligned:
        return torch.randn(n + 1).to(dtype)[1:]
    return torch.randn(n).to(dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _state(params, value=0.5):
    return torch.full(params.shape, value, dtype=_flat_optim.state_dtype(params.dtype))


def _step(params, value=2.0):
    return torch.tensor(value, dtype=_flat_optim.state_dtype(params.dtype))


def _backward(outputs):
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])


def _case_flat_sgd_step():
    for dtype, n, unaligned, variant in _flat_configs(2):
        weight_decay = (0.0, 0.01)[variant]  # 0: the backward writes only d_grad
        params, grad = _leaves(_flat(n, dtype, unaligned), _flat(n, dtype, unaligned))
        out = sf.flat_sgd_step(params, grad, 0.1, weight_decay)
        v = torch.randn_like(out).requires_grad_(True)
        # create_graph: the backward kernel, then its own backward (the forward kernel again).
        d_params, d_grad = torch.autograd.grad(out, (params, grad), v, create_graph=True)
        torch.autograd.grad(d_params.sum() + d_grad.sum(), v)
        with torch.no_grad():  # in place, integer hyper-parameters
            p = _flat(n, dtype, unaligned)
            sf.flat_sgd_step(p, _flat(n, dtype, unaligned), 1, 0, out=p)


def _case_flat_momentum():
    variants = [(nesterov, wd) for nesterov in (False, True) for wd in (0.0, 0.01)]
    for dtype, n, unaligned, variant in _flat_configs(len(variants)):
        nesterov, weight_decay = variants[variant]
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        buf, step = _state(params), _step(params)
        _backward(sf.flat_momentum_step(*_leaves(params, grad, buf), step, 0.1, 0.9, 0.1,
                                        weight_decay, nesterov))  # fmt: skip
        with torch.no_grad():
            sf.flat_momentum_step_(params, grad, buf, step, 0.1, 0.9, 0.0, weight_decay, nesterov)


def _case_flat_adam():
    variants = [(decoupled, wd) for decoupled in (False, True) for wd in (0.0, 0.01)]
    for dtype, n, unaligned, variant in _flat_configs(len(variants)):
        decoupled, weight_decay = variants[variant]
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        m, v, step = _state(params, 0.1), _state(params, 0.2), _step(params)
        fn = sf.flat_adamw_step if decoupled else sf.flat_adam_step
        _backward(fn(*_leaves(params, grad, m, v), step, 1e-3, weight_decay=weight_decay))
        with torch.no_grad():
            sf.flat_adam_step_(params, grad, m, v, step, 1e-3, weight_decay=weight_decay,
                               decoupled=decoupled)  # fmt: skip


def _case_flat_clip_adam():
    for dtype, n, unaligned, variant in _flat_configs(2):
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        m, v, step = _state(params, 0.1), _state(params, 0.2), _step(params)
        max_norm = (1.0, None)[variant]  # a norm: the sum-of-squares kernel and CLIP=True
        sf.flat_clip_adam_step_(params, grad, m, v, step, 1e-3, max_norm=max_norm)


def _case_flat_rmsprop():
    variants = [(centered, wd) for centered in (False, True) for wd in (0.0, 0.01)]
    for dtype, n, unaligned, variant in _flat_configs(len(variants)):
        centered, weight_decay = variants[variant]
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        square_avg, grad_avg = _state(params, 0.5), _state(params, 0.1)
        leaves = _leaves(params, grad, square_avg, grad_avg)
        _backward(sf.flat_rmsprop_step(*leaves[:3], 1e-2, weight_decay=weight_decay,
                                       grad_avg=leaves[3] if centered else None))  # fmt: skip
        with torch.no_grad():
            sf.flat_rmsprop_step_(params, grad, square_avg, 1e-2, weight_decay=weight_decay,
                                  grad_avg=grad_avg if centered else None)  # fmt: skip


def _case_flat_adagrad():
    for dtype, n, unaligned, variant in _flat_configs(2):
        weight_decay = (0.0, 0.01)[variant]  # 0: the backward does not read params
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        state_sum, step = _state(params, 0.5), _step(params)
        leaves = _leaves(params, grad, state_sum)
        _backward(_flat_optim.flat_adagrad_step(*leaves, step, 1e-2, lr_decay=0.01,
                                                weight_decay=weight_decay))  # fmt: skip
        with torch.no_grad():
            _flat_optim.flat_adagrad_step_(params, grad, state_sum, step, 1e-2,
                                           weight_decay=weight_decay)  # fmt: skip


def _case_flat_adadelta():
    for dtype, n, unaligned, variant in _flat_configs(2):
        weight_decay = (0.0, 0.01)[variant]  # 0: the backward does not read params
        params, grad = _flat(n, dtype, unaligned), _flat(n, dtype, unaligned)
        square_avg, acc_delta = _state(params, 0.5), _state(params, 0.1)
        leaves = _leaves(params, grad, square_avg, acc_delta)
        _backward(_flat_optim.flat_adadelta_step(*leaves, 1.0, weight_decay=weight_decay))
        with torch.no_grad():
            _flat_optim.flat_adadelta_step_(params, grad, square_avg, acc_delta, 1.0,
                                            weight_decay=weight_decay)  # fmt: skip


def _case_flat_accumulate():
    for dtype, n, unaligned, _ in _flat_configs(1):
        grad = _flat(n, dtype, unaligned)
        sf.flat_accumulate_(_state(grad), grad, 0.5)


# (batch, classes): every kind at (7, 13) and over one row and one class (two for ice_paper,
# which refuses one) at float32 and float64; ce in every dtype at (7, 13), and at float32 over
# one class in several rows, 16-divisible batch and class counts, one chunk of classes (1000)
# and many (70,000: 69 chunks of 1024).
CE_LOSS_SHAPES = ((3, 1), (16, 10), (5, 16), (2, 1000), (1, 70_000))
LOSS_KINDS = {
    "ce": sf.cross_entropy,
    "ice": sf.inverse_cross_entropy,
    "ice_paper": sf.inverse_cross_entropy_paper,
    "klu": sf.kl_uniform,
}


def _loss_configs():
    for kind in LOSS_KINDS:
        yield F32, (7, 13), kind
        for dtype in (F32, F64):
            yield dtype, (1, 2) if kind == "ice_paper" else (1, 1), kind
    for dtype in (F16, BF16, F64):
        yield dtype, (7, 13), "ce"
    for shape in CE_LOSS_SHAPES:
        yield F32, shape, "ce"


def _case_classification_losses():
    for dtype, (batch, classes), kind in _loss_configs():
        if kind == "ice_paper" and classes < 2:
            continue  # refused: -log(1 - p_y) is +inf with one class
        logits = torch.randn(batch, classes).to(dtype).requires_grad_(True)
        loss = LOSS_KINDS[kind](logits, torch.randint(0, classes, (batch,)))
        (g,) = torch.autograd.grad(loss, logits, create_graph=kind == "ce")
        if kind == "ce":  # the double backward (torch ops only: no kernel, but the same path)
            torch.autograd.grad(g.sum(), logits)
    # Rows not contiguous with each other: the row stride (40) is not the class count (33).
    sf.cross_entropy(torch.randn(4, 40)[:, :33], torch.randint(0, 33, (4,)))


# (batch, channels, height, width) of the generation losses: one element, odd, 16-divisible,
# and more than one program's block.
MSE_SHAPES = ((1, 1, 1, 1), (1, 3, 5, 7), (2, 4, 8, 8), (3, 3, 33, 33))


def _case_generation_losses():
    configs = [(F32, shape) for shape in MSE_SHAPES]
    configs += [(dtype, (2, 4, 8, 8)) for dtype in (F16, BF16, F64)]
    configs += [(F64, (1, 1, 1, 1)), (F64, (1, 3, 5, 7))]
    for dtype, shape in configs:
        prediction = torch.randn(shape).to(dtype).requires_grad_(True)
        target = torch.randn(shape).to(dtype)
        torch.autograd.grad(sf.mse_ascent(prediction, target), prediction)
        torch.autograd.grad(sf.dos(prediction), prediction)


# (batch, channels, height, width) at float32: a map whose sizes and strides are constants of 1
# (1x1 maps; a 2x2 input pools to 1x1), odd sizes, and a 16-divisible shape; the first also at
# float64; the layouts (channels_last makes the channel stride the constant 1 instead of the
# width stride) and the affine / running-statistics variants at float32 on the odd shape, and
# float16 and bfloat16 there too.
BN_SHAPES = ((2, 3, 1, 1), (3, 5, 7, 2), (4, 16, 8, 8))
POOL_SHAPES = ((2, 2, 2, 2), (2, 3, 5, 7), (4, 16, 8, 8))


def _bn_configs(shapes):
    """(dtype, shape, channels_last, affine, running)."""
    for shape in shapes:
        yield F32, shape, False, True, True
    yield F64, shapes[0], False, True, True
    for channels_last, affine, running in ((True, True, True), (False, False, False),
                                           (True, False, True)):  # fmt: skip
        yield F32, shapes[1], channels_last, affine, running
    for dtype in (F16, BF16):
        yield dtype, shapes[1], True, True, True


def _bn_inputs(dtype, shape, channels_last, affine, running):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.linspace(0.5, 2, c).to(dtype).requires_grad_(True) if affine else None
    bias = torch.linspace(-1, 1, c).to(dtype).requires_grad_(True) if affine else None
    stats = (torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)) if running else (None, None)
    return x.requires_grad_(True), weight, bias, *stats


def _case_batch_norm():
    for config in _bn_configs(BN_SHAPES):
        x, weight, bias, running_mean, running_var = _bn_inputs(*config)
        y = sf.batch_norm2d(x, weight, bias, running_mean, running_var, 0.1, 1e-5)
        leaves = [t for t in (x, weight, bias) if t is not None]
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y), create_graph=True)
        # The double backward, with and without each incoming gradient.
        torch.autograd.grad(
            sum(g.sum() for g in grads), leaves, allow_unused=True, retain_graph=True
        )
        torch.autograd.grad(grads[0].sum(), leaves, allow_unused=True)


def _case_bn_relu_pool():
    for config in _bn_configs(POOL_SHAPES):
        x, weight, bias, running_mean, running_var = _bn_inputs(*config)
        y = sf.batch_norm_relu_maxpool2d(x, weight, bias, running_mean, running_var, 0.1, 1e-5)
        leaves = [t for t in (x, weight, bias) if t is not None]
        torch.autograd.grad(y, leaves, torch.randn_like(y))


CASES: dict[str, Callable[[], None]] = {
    "flat_sgd_step": _case_flat_sgd_step,
    "flat_momentum_step": _case_flat_momentum,
    "flat_adam_step": _case_flat_adam,
    "flat_clip_adam_step_": _case_flat_clip_adam,
    "flat_rmsprop_step": _case_flat_rmsprop,
    "flat_adagrad_step": _case_flat_adagrad,
    "flat_adadelta_step": _case_flat_adadelta,
    "flat_accumulate_": _case_flat_accumulate,
    "classification_losses": _case_classification_losses,
    "generation_losses": _case_generation_losses,
    "batch_norm2d": _case_batch_norm,
    "batch_norm_relu_maxpool2d": _case_bn_relu_pool,
}


# ------------------------------------------------------------------------------- compile twins
def kernel_name(kernel) -> str:
    return f"{kernel.fn.__module__}.{kernel.fn.__qualname__}"


class Twins:
    """A compilable ``JITFunction`` for every function :func:`_triton.jit` wrapped.

    The package's kernels are interpreter wrappers here, and so are the jit helpers they call
    through their module's globals; each twin is the same code over a copy of its module's
    globals in which every wrapper is replaced by its twin, so the code generator sees
    ``JITFunction`` callees as on a GPU.
    """

    def __init__(self) -> None:
        self.kernels = list(_triton.KERNELS)
        wrapped = {id(k): k for k in self.kernels}
        copies: dict[int, dict] = {}
        self.by_id: dict[int, JITFunction] = {}
        for k in self.kernels:
            raw = k.fn
            scope = copies.setdefault(id(raw.__globals__), dict(raw.__globals__))
            fn = types.FunctionType(
                raw.__code__, scope, raw.__name__, raw.__defaults__, raw.__closure__
            )
            fn.__qualname__, fn.__module__, fn.__doc__ = (
                raw.__qualname__,
                raw.__module__,
                raw.__doc__,
            )
            fn.__annotations__, fn.__kwdefaults__ = raw.__annotations__, raw.__kwdefaults__
            self.by_id[id(k)] = JITFunction(fn)
        for scope in copies.values():
            for name, value in list(scope.items()):
                if id(value) in wrapped:
                    scope[name] = self.by_id[id(value)]

    def __getitem__(self, kernel) -> JITFunction:
        return self.by_id[id(kernel)]

    def callees(self, kernel) -> set:
        """The wrapped jit functions ``kernel`` calls, directly or through other helpers."""
        wrapped = {id(k): k for k in self.kernels}
        seen: set[int] = set()
        todo = [kernel]
        while todo:
            fn = todo.pop().fn
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                target = _resolve(node.func, fn.__globals__)
                if id(target) in wrapped and id(target) not in seen and target is not kernel:
                    seen.add(id(target))
                    todo.append(target)
        return {wrapped[i] for i in seen}


def _resolve(node, scope):
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return getattr(base, node.attr, None) if isinstance(base, types.ModuleType) else None
    return None


# --------------------------------------------------------------------------- record, specialise
@dataclasses.dataclass
class Compilation:
    """One unique (kernel, target, signature, constants, attributes, options) to compile.

    Plain data (the kernel by name): it travels to the compile workers, which never ran the
    interpreter (it patches triton.language in place, and a patched module cannot compile).
    """

    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    case: str
    arguments: str

    def describe(self) -> str:
        spec = ", ".join(
            f"{name}={self.constexprs[(i,)]!r}"
            if (i,) in self.constexprs
            else f"{name}: {ty}" + (" %16" if self.attrs.get((i,)) else "")
            for i, (name, ty) in enumerate(self.signature.items())
        )
        return (
            f"{self.kernel} sm_{self.arch} num_warps={self.options['num_warps']} "
            f"num_stages={self.options['num_stages']} ({spec})"
        )


def _describe_argument(value) -> str:
    if isinstance(value, torch.Tensor):
        align = "aligned" if value.data_ptr() % 16 == 0 else f"ptr%16={value.data_ptr() % 16}"
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} {align}"
    return repr(value)


MAX_INTERPRETED_PROGRAMS = 64


class Recorder:
    """The launch hook: specialises each launch for every target as ``JITFunction.run`` would."""

    def __init__(self, twins: Twins, archs=ARCHS) -> None:
        self.twins = twins
        self.backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
        self.binders: dict = {}
        self.compilations: dict[tuple, Compilation] = {}
        self.launches: dict[str, int] = {}
        self.case = ""

    def __call__(self, kernel, grid, args, kwargs) -> bool:
        self._record(kernel, args, kwargs)
        # Interpreting costs ~4 ms per program: the clip norm's 1024-program launch would take
        # 4.5 s. Such launches are recorded, not run; what reads their outputs then sees unset
        # values, which changes no later launch's shapes, dtypes or flags.
        return callable(grid) or math.prod(grid) <= MAX_INTERPRETED_PROGRAMS

    def _record(self, kernel, args, kwargs) -> None:
        twin = self.twins[kernel]
        name = kernel_name(kernel)
        self.launches[name] = self.launches.get(name, 0) + 1
        arguments = None
        for arch, backend in self.backends.items():
            key = (id(kernel), arch)
            if key not in self.binders:
                self.binders[key] = create_function_from_signature(
                    twin.signature, twin.params, backend
                )
            bound, specialization, options = self.binders[key](*args, **kwargs)
            options, signature, constexprs, attrs = twin._pack_args(
                backend, dict(kwargs), bound, specialization, options
            )
            unique = (
                name,
                arch,
                tuple(signature.items()),
                tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in attrs.items())),
                repr(options),
            )
            if unique in self.compilations:
                continue
            if arguments is None:
                arguments = ", ".join(
                    [_describe_argument(a) for a in args]
                    + [f"{k}={_describe_argument(v)}" for k, v in kwargs.items()]
                )
            self.compilations[unique] = Compilation(
                name,
                arch,
                signature,
                constexprs,
                attrs,
                dict(options.__dict__),
                self.case,
                arguments,
            )


def record(cases: dict[str, Callable[[], None]] | None = None, archs=ARCHS):
    """Run ``cases`` under the forced triton backend; returns (twins, recorder)."""
    twins = Twins()
    recorder = Recorder(twins, archs)
    with _triton.launch_hook(recorder), sf.use_backend("triton"), warnings.catch_warnings():
        # Values are beside the point here (and skipped launches leave outputs unset).
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, case in (CASES if cases is None else cases).items():
            recorder.case = name
            case()
    return twins, recorder


def coverage(twins: Twins, recorder: Recorder) -> tuple[set[str], set[str], set[str]]:
    """(launched kernels, helpers reached from them, wrapped functions reached by neither)."""
    launched = {c.kernel for c in recorder.compilations.values()}
    launched_wrapped = [k for k in twins.kernels if kernel_name(k) in launched]
    helpers = set()
    for kernel in launched_wrapped:
        helpers |= twins.callees(kernel)
    names = {kernel_name(k) for k in twins.kernels}
    launched_names = {kernel_name(k) for k in launched_wrapped}
    helper_names = {kernel_name(k) for k in helpers} - launched_names
    return launched_names, helper_names, names - launched_names - helper_names


# ----------------------------------------------------------------------------------- compile
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_TWINS: dict[str, JITFunction] = {}  # kernel name -> twin, in each compile worker


@dataclasses.dataclass
class Result:
    index: int
    seconds: float
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    error: str | None = None

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _init_worker() -> None:
    twins = Twins()
    _TWINS.update({kernel_name(k): twins[k] for k in twins.kernels})
    triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin then prints ptxas -v's report


def compile_one(item: tuple[int, Compilation]) -> Result:
    """Compile one item to a cubin (in a worker); registers and spills from ptxas's ``-v`` log."""
    index, c = item
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(_TWINS[c.kernel], c.signature, c.constexprs, c.attrs),
                target=GPUTarget("cuda", c.arch, 32),
                options=c.options,
            )
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its launch
        return Result(index, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    result = Result(index, time.perf_counter() - start)
    if not compiled.asm.get("cubin"):
        result.error = "no cubin produced"
        return result
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        result.error = f"ptxas -v report not found in:\n{text[-2000:]}"
        return result
    result.registers = int(regs.group(1))
    result.stack, result.spill_stores, result.spill_loads = map(int, spills.groups())
    return result


def compile_all(compilations: list[Compilation], jobs: int) -> list[Result]:
    """Compile every item on ``jobs`` fresh (spawned) processes; results in completion order."""
    # Largest blocks first: they compile slowest, and the workers then finish together.
    order = sorted(
        range(len(compilations)),
        key=lambda i: (
            -max((v for v in compilations[i].constexprs.values() if type(v) is int), default=0)
        ),
    )
    os.environ[_WORKER_FLAG] = "1"  # read by the workers' import of this module
    try:
        pool = multiprocessing.get_context("spawn").Pool(max(1, jobs), _init_worker)
    finally:
        del os.environ[_WORKER_FLAG]
    with pool:
        return list(pool.imap_unordered(compile_one, [(i, compilations[i]) for i in order]))


def _isolate() -> None:
    """Keep the Triton cache and ptxas temporaries under build/triton-check (fresh each run)."""
    import shutil

    shutil.rmtree(BUILD, ignore_errors=True)
    (BUILD / "tmp").mkdir(parents=True)
    os.environ["TRITON_HOME"] = str(BUILD)
    os.environ["TRITON_CACHE_DIR"] = str(BUILD / "cache")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TMPDIR"] = str(BUILD / "tmp")
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--list", action="store_true", help="print every specialisation")
    parser.add_argument(
        "--allow-spills",
        action="store_true",
        help="report register spills without failing (compile errors still fail)",
    )
    args = parser.parse_args(argv)
    _isolate()
    start = time.perf_counter()
    twins, recorder = record(archs=args.arch)
    recorded = time.perf_counter() - start
    launched, helpers, uncovered = coverage(twins, recorder)
    compilations = list(recorder.compilations.values())
    if _triton.INTERPRETED:
        print("triton-check: the launchers planned for the interpreter, not a GPU", file=sys.stderr)
        return 1
    print(
        f"triton {triton.__version__}, torch {torch.__version__}: recorded "
        f"{sum(recorder.launches.values())} launches of {len(launched)} kernels in "
        f"{len(CASES)} cases ({recorded:.1f} s); {len(compilations)} specialisations to compile "
        f"for {', '.join(f'sm_{a}' for a in args.arch)} on {args.jobs} processes",
        flush=True,
    )
    results = compile_all(compilations, args.jobs)
    failed = [r for r in results if r.error]
    spilled = [r for r in results if not r.error and r.spills]
    per_kernel: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        c = compilations[r.index]
        per_kernel.setdefault((c.kernel, c.arch), []).append(r)
    print(f"{'kernel':<62} {'arch':>5} {'specs':>5} {'regs':>9} {'spill B':>8} {'s':>6}")
    for (name, arch), rs in sorted(per_kernel.items()):
        ok = [r for r in rs if not r.error]
        regs = [r.registers for r in ok]
        span = f"{min(regs)}-{max(regs)}" if regs else "-"
        spill = max((r.spill_stores + r.spill_loads for r in ok), default=0)
        print(
            f"{name.removeprefix('sophon_fast.ops.'):<62} sm_{arch:<2} {len(rs):>5} {span:>9} "
            f"{spill:>8} {sum(r.seconds for r in rs):>6.1f}"
        )
    if args.list:
        for r in sorted(results, key=lambda r: compilations[r.index].describe()):
            print(f"  {compilations[r.index].describe()}: regs={r.registers} "
                  f"spill={r.spill_stores}/{r.spill_loads} {'ERROR' if r.error else ''}")  # fmt: skip
    for r in failed + spilled:
        c = compilations[r.index]
        what = "COMPILE ERROR" if r.error else (
            f"SPILLS {r.spill_stores} B stored, {r.spill_loads} B loaded, {r.stack} B stack, "
            f"{r.registers} registers"
        )  # fmt: skip
        print(f"\n{what}: {c.describe()}\n  case {c.case}: launched with ({c.arguments})")
        if r.error:
            print(textwrap.indent(r.error.strip(), "  "))
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    print(
        f"\ntriton-check: {len(launched)} kernels (+{len(helpers)} jit helpers through them), "
        f"{len(compilations)} specialisations for {len(args.arch)} targets: "
        f"{len(compilations) - len(failed)} compiled, {len(failed)} failed, "
        f"{len(spilled)} spill; {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU"
    )
    if uncovered:
        print(f"triton-check: jit functions no case reaches: {', '.join(sorted(uncovered))}")
    if failed or (spilled and not args.allow_spills):
        return 1
    return 2 if uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
