"""CUDA graphs and autocast for the fast engine (GPU only; every path here is off by default).

Two capture modes (``engine_options["cuda_graphs"]``, :mod:`sophon_fast.engine.options`):

- ``"inner"`` (order 1): ONE first-order inner step is captured and replayed K times:
  adapt forward + backward, the fused inner update, evaluation forward + backward, meta-gradient,
  loss and accuracy accumulation, all over static buffers (phi, optimizer state, scratch BatchNorm
  statistics, the batch and its split indices). A step of a small model is ~100-2000 kernel
  launches; a replay is one launch, so launch-bound steps (CIFAR sizes) gain the most. The maths
  is that of :func:`sophon_fast.engine.inner.simulate_flat`'s order-1 loop with the same
  kernels except one, so NOT bitwise the eager loop's: the graph accumulates the meta-gradient
  as a multiply then an add (``meta_grad.add_(g_k * w_k)``, w_k = n_k / N held in a static
  buffer), where the eager loop calls the fused ``flat_accumulate_`` (one rounding where its
  kernel fuses them). The two agree to rounding (float64 test: rtol 1e-12), not bit for bit.
- ``"simulation"`` (any order): the whole :func:`simulate_flat` call, all K steps unrolled, is one
  graph (the eager code captured as is; order 2: including the double backward). Memory: the
  pool keeps every intermediate of all K steps, as an order-2 simulation does anyway.

Requirements (otherwise capture fails, a warning says why and the engine runs eagerly): static
shapes (the same batch size, adapt / evaluate sizes and K every simulation; the official split is
static), no host synchronisation in the model's forward (BatchNorm with ``momentum=None`` reads
``num_batches_tracked`` on the host: not capturable), CUDA tensors. A new shape recaptures.

Memory (:class:`GraphCache`, one per engine): every graph of an engine is captured into ONE
memory pool (``torch.cuda.graph_pool_handle()``), so graphs for several adversaries reuse each
other's intermediate memory instead of each holding a private pool. That is safe because they
replay one at a time on one stream and every ``run`` copies its outputs out before another graph
replays (what lives across replays, the static buffers, is allocated outside the pool). A capture
for new shapes first frees every graph of other shapes, at most ``GraphCache.max_graphs`` graphs
are kept (least recently used freed first), and ``GraphCache.clear()`` (or dropping the engine)
frees them all.

Autocast (``engine_options["autocast"]``): ``"bf16"`` runs every model forward under
``torch.autocast("cuda", torch.bfloat16, cache_enabled=False)`` and hands float32 logits to the
loss. The weight cache MUST be off: with it, the bf16 copies of the step-0 weights are reused for
all K steps inside one autocast region and the meta-gradient is silently wrong (~80 % off,
measured). ``"tf32"`` allows TF32 in cuBLAS matmuls and cuDNN convolutions for the duration of
each engine call (flags restored afterwards). Both change the numbers (bf16: ~1e-2 relative on
the meta-gradient; TF32: ~1e-3), which is why they are opt-in.

Status: written against the documented torch.cuda.graph / autocast / graph_pool_handle APIs; not
yet run on a GPU (benchmarks/gpu/run.sh runs them when a GPU is available). On the CPU the tests
run the static-buffer logic and the cache's eviction with a stand-in for the capture.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from sophon_fast.engine.functional import to_channels_last
from sophon_fast.engine.optimizers import init_state, inner_step
from sophon_fast.reference.flat_common import state_dtype
from sophon_fast.reference.trajectory import trajectory_weights

__all__ = ["AutocastModel", "GraphCache", "GraphedInnerStep", "GraphedSimulation", "precision"]

# The pool of the GraphCache.capture in progress on this thread (None: a private pool per graph).
_ambient = threading.local()


class AutocastModel:
    """A FunctionalModel wrapper that runs each forward under bf16 autocast (weight cache off).

    Shapes: as :class:`sophon_fast.engine.functional.FunctionalModel`; logits come back float32.
    """

    def __init__(self, fmodel, dtype: torch.dtype = torch.bfloat16) -> None:
        self.fmodel = fmodel
        self.module = fmodel.module
        self.layout = fmodel.layout
        self.dtype = dtype

    def __call__(self, params, stats, counters, x, *, train: bool) -> torch.Tensor:
        # Entered per forward with cache_enabled=False: see the module docstring (80 % error).
        with torch.autocast(device_type="cuda", dtype=self.dtype, cache_enabled=False):
            out = self.fmodel(params, stats, counters, x, train=train)
        return out.float() if out.dtype != params.dtype else out


@contextlib.contextmanager
def precision(mode: str | None) -> Iterator[None]:
    """TF32 on for the block when ``mode == "tf32"`` (flags restored afterwards); else nothing."""
    if mode != "tf32":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def _capture(body, warmup: int = 2, pool=None) -> torch.cuda.CUDAGraph:
    """Warm ``body`` up on a side stream (as torch.cuda.graph requires), then capture it into
    ``pool`` (a ``torch.cuda.graph_pool_handle()``; None: a private pool)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


def _pool(pool):
    return pool if pool is not None else getattr(_ambient, "pool", None)


def _release(graph) -> None:
    """Free a captured graph now (its replay kernels and its share of the pool)."""
    reset = getattr(graph, "reset", None)
    if reset is not None:
        reset()


class GraphedInnerStep:
    """One first-order inner step as a CUDA graph over static buffers (see the module docstring).

    Built per (batch shape, adapt size, eval size, adversary); :meth:`run` executes a whole
    order-1 simulation by K replays and returns (loss (), accuracy (), meta_grad (n_params,)).
    """

    def __init__(
        self,
        fmodel,
        flat,
        *,
        x_shape: Sequence[int],
        x_dtype: torch.dtype,
        adapt_size: int,
        eval_size: int,
        suppression_loss,
        adapt_loss,
        adversary,
        channels_last: bool,
        pool=None,
        step_weighting: tuple[str, float] = ("uniform", 0.0),
    ) -> None:
        device = flat.params.device
        self.step_weighting = tuple(step_weighting)
        self.flat = flat
        self.dtype = state_dtype(flat.params.dtype)
        self.phi = flat.params.detach().clone()
        self.stats, self.counters = flat.stats.clone(), flat.counters.clone()
        self.state = init_state(adversary.name, self.phi)
        self.state0 = {k: v.clone() for k, v in self.state.items()}
        self.meta_grad = torch.zeros(self.phi.shape, dtype=self.dtype, device=device)
        self.loss_total = torch.zeros((), dtype=self.dtype, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.weight = torch.zeros((), dtype=self.dtype, device=device)
        self.x = torch.zeros(tuple(x_shape), dtype=x_dtype, device=device)
        self.y = torch.zeros(x_shape[0], dtype=torch.int64, device=device)
        self.a = torch.arange(adapt_size, device=device)
        self.e = torch.arange(eval_size, device=device)

        def rows(index):
            picked = self.x.index_select(0, index)
            return to_channels_last(picked) if channels_last else picked

        def body():
            phi = self.phi.detach().requires_grad_(True)
            logits = fmodel(phi, self.stats, self.counters, rows(self.a), train=True)
            (grad,) = torch.autograd.grad(adapt_loss(logits, self.y.index_select(0, self.a)), phi)
            with torch.no_grad():
                new, state = inner_step(adversary, phi.detach(), grad, self.state)
            new = new.detach().requires_grad_(True)
            y_eval = self.y.index_select(0, self.e)
            eval_logits = fmodel(new, self.stats, self.counters, rows(self.e), train=True)
            step_loss = suppression_loss(eval_logits, y_eval)
            (step_grad,) = torch.autograd.grad(step_loss, new)
            with torch.no_grad():
                self.meta_grad.add_(step_grad.to(self.dtype) * self.weight)
                self.loss_total.add_(self.weight * step_loss.detach().to(self.dtype))
                self.correct.add_((eval_logits.detach().argmax(1) == y_eval).sum())
                self.phi.copy_(new.detach())
                for key, value in state.items():
                    self.state[key].copy_(value)

        self._reset(flat.params.detach(), None)
        self.graph = _capture(body, pool=_pool(pool))

    def release(self) -> None:
        """Free the graph; the object cannot run afterwards."""
        _release(self.graph)
        self.graph = None

    def _reset(self, theta: torch.Tensor, head: list[tuple[slice, torch.Tensor]] | None) -> None:
        with torch.no_grad():
            self.phi.copy_(theta)
            for where, value in head or ():
                self.phi[where] = value
            self.stats.copy_(self.flat.stats)
            self.counters.copy_(self.flat.counters)
            for key, value in self.state0.items():
                self.state[key].copy_(value)
            self.meta_grad.zero_()
            self.loss_total.zero_()
            self.correct.zero_()

    def run(self, batches, adapt_index, eval_index, head, keep_stats: bool):
        """K replays; ``head``: [(slice, values)] written into phi_0, or None."""
        self._reset(self.flat.params.detach(), head)
        counts = [int(e.numel()) for e in eval_index]
        total = sum(counts)
        weights = trajectory_weights(counts, *self.step_weighting)
        for k, (x, y) in enumerate(batches):
            self.x.copy_(x, non_blocking=True)
            self.y.copy_(y, non_blocking=True)
            self.a.copy_(adapt_index[k], non_blocking=True)
            self.e.copy_(eval_index[k], non_blocking=True)
            self.weight.fill_(weights[k])
            self.graph.replay()
        if keep_stats:
            with torch.no_grad():
                self.flat.stats.copy_(self.stats)
                self.flat.counters.copy_(self.counters)
        accuracy = self.correct.to(self.dtype) / total
        return self.loss_total.clone(), accuracy, self.meta_grad.clone()


class GraphedSimulation:
    """The whole ``simulate_flat`` call (K steps, any order) as one CUDA graph.

    Static inputs are copied in before each replay; the outputs are cloned out after it.
    """

    def __init__(self, simulate, batches, adapt_index, eval_index, head_values, pool=None) -> None:
        self.batches = [(x.clone(), y.clone()) for x, y in batches]
        self.adapt_index = [a.clone() for a in adapt_index]
        self.eval_index = [e.clone() for e in eval_index]
        self.head_values = (
            None if head_values is None else {k: v.clone() for k, v in head_values.items()}
        )
        self.outputs: Any = None

        def body():
            self.outputs = simulate(
                self.batches, self.adapt_index, self.eval_index, self.head_values
            )

        self.graph = _capture(body, pool=_pool(pool))

    def release(self) -> None:
        """Free the graph and its outputs; the object cannot run afterwards."""
        _release(self.graph)
        self.graph, self.outputs = None, None

    def run(self, batches, adapt_index, eval_index, head_values):
        for (x_static, y_static), (x, y) in zip(self.batches, batches):
            x_static.copy_(x, non_blocking=True)
            y_static.copy_(y, non_blocking=True)
        for static, index in zip(self.adapt_index + self.eval_index, adapt_index + eval_index):
            static.copy_(index, non_blocking=True)
        if head_values:
            for name, value in head_values.items():
                self.head_values[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


def capture_or_warn(build, what: str):
    """``build()``, or None with a warning when capture fails (the engine then runs eagerly)."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
        warnings.warn(
            f"CUDA graph capture of the {what} failed ({type(error).__name__}: {error}); "
            "running it eagerly",
            stacklevel=3,
        )
        return None


class GraphCache:
    """The captured graphs of one engine: key -> GraphedInnerStep / GraphedSimulation / None
    (None: not capturable, run eagerly), all in one memory pool (see the module docstring).

    Reads like a dict (``key in cache``, ``cache[key]``, ``len``, ``values()``); graphs enter only
    through :meth:`capture`, which frees the graphs of other shapes first and keeps at most
    ``max_graphs`` (4: e.g. one per adversary of a draw; each GraphedInnerStep also holds ~5
    parameter-sized static buffers outside the pool).
    """

    def __init__(self, max_graphs: int = 4) -> None:
        if max_graphs < 1:
            raise ValueError(f"GraphCache: max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any]] = OrderedDict()
        self._pool = None

    def pool(self):
        """The engine's one capture pool (made on first use; None without CUDA)."""
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __getitem__(self, key: Hashable):
        self._entries.move_to_end(key)  # least recently used is first
        return self._entries[key][1]

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def values(self) -> list:
        return [graph for _, graph in self._entries.values()]

    def capture(self, key: Hashable, build: Callable[[], Any], what: str, *, shape: Hashable):
        """Capture ``build()`` (through :func:`capture_or_warn`) for ``key`` into the shared pool,
        after freeing every graph whose ``shape`` differs and the least recently used beyond
        ``max_graphs - 1``; returns the graph, or None when capture failed."""
        for old in [k for k, (s, _) in self._entries.items() if s != shape]:
            self._free(old)
        while len(self._entries) >= self.max_graphs:
            self._free(next(iter(self._entries)))
        _ambient.pool = self.pool()
        try:
            graph = capture_or_warn(build, what)
        finally:
            _ambient.pool = None
        self._entries[key] = (shape, graph)
        return graph

    def _free(self, key: Hashable) -> None:
        _, graph = self._entries.pop(key)
        if graph is not None:
            graph.release()

    def clear(self) -> None:
        """Free every graph (the pool goes with the last of them)."""
        for key in list(self._entries):
            self._free(key)
