"""Data-parallel SOPHON over ``torch.distributed``: protect() and evaluate() across processes and GPUs.

Nothing here runs unless a process group is initialised (``torch.distributed.is_available()`` and
``is_initialized()``) with more than one rank: without one, :func:`current` returns None and
protect() / evaluate() take exactly their single-process code paths.

**Who runs what.** Every rank holds the whole model, the whole data and the same seeded generator,
and draws *every* simulation of an outer step from it (batches, splits, head values, adversary:
cheap index work), so all ranks consume the generator identically and the set of draws is the
single-process run's. The work units of one meta step are the (simulation, adversary) pairs in
draw order: ``ProtectConfig.simulations`` draws times one adversary (``adversary_sampling="one"``)
or every adversary (``"all"``). Unit ``i`` runs on rank ``i % world_size``; a rank keeps only the
batches of the draws it runs.

**What is averaged, and how.** Each rank sums its units' meta-gradients (flat; the reference
engine's per-name dict is concatenated in parameter order), appends the summed suppression loss
and restricted accuracy, and ONE ``all_reduce(SUM)`` of that flat buffer per meta step gives the
sum over all units, which is divided by the unit count, the arithmetic of the single-process
``sum(grads) / count``. With one unit per rank on two ranks the meta-gradient is bit-identical to the
single-process run's; with more units per rank the partial sums are grouped differently (a
rounding-level difference, ~1e-16 relative). Every rank then takes the same clipped Adam step, so
the weights stay identical on all ranks without a broadcast.

**NTR.** The original batch is drawn on every rank from the shared generator and split
DistributedSampler-style (rank ``r`` takes rows ``r, r + W, r + 2W, ...``). Each rank's engine
runs its own ``ntr_step`` on its shard, whose ``reduce`` hook scales the shard's mean-CE gradient
and loss by ``n_shard / n_batch``; ONE ``all_reduce(SUM)`` of that flat buffer gives the gradient
of the full batch's mean CE, and every rank takes the same NTR Adam step.

**BatchNorm rule.** NTR forwards normalise each rank's shard by the shard's own batch statistics
(as DistributedDataParallel without SyncBatchNorm). After every outer step the floating-point
BatchNorm buffers (running mean and variance) are averaged over the ranks (one ``all_reduce``) and
the integer ``num_batches_tracked`` counters take the maximum, so all ranks carry the same
statistics before the evaluation and the next step. The averaged running mean equals the
single-process one (to rounding) when the shards are equal; the averaged running variance is the
mean of the shards' unbiased variances, close to but not equal to the full batch's, and the
shard-normalised NTR gradient differs from the full-batch one. So the distributed run equals the
single-process run for models without BatchNorm (and for BatchNorm models whose NTR is off); with
BatchNorm it is the usual data-parallel approximation. Simulations restore the statistics
(``restore_bn=True``, the default); with ``restore_bn=False`` each rank drifts them through its
own simulations only, then the averaging above applies.

**Callbacks and the guard.** Every rank records the same history (the averaged losses and
accuracies; only ``seconds`` is per rank) and calls the callbacks with it; a callback that returns
True on any rank stops every rank after that step (one tiny ``all_reduce`` per outer step). The
evaluation and the guard see the same weights on every rank and decide alike.

**Checkpoints and reports.** Only rank 0 writes checkpoints (atomically), ``ProtectResult.save``
from the CLI and evaluate()'s report files; ``resume`` makes every rank read the checkpoint, so the
checkpoint directory must be visible to every rank (one node, or a shared file system). A
checkpoint holds no rank-specific state: it resumes under any world size.

**Scope.** Both engines (the fast engine's flat meta-gradient as is; the reference engine's per-name
dict flattened in parameter order for the one ``all_reduce``) and both modes. In generation mode
(:mod:`sophon_fast.engine.generation`) the engines draw each simulation's noise from the shared
generator: a rank skips a unit it does not run by drawing (and dropping) that unit's noise
(``engine.skip_simulation``), and the NTR noise is drawn for the whole batch before the batch is
sharded (``engine.ntr_inputs``), so every rank's generator stays in step with the single-process
run. The averaged "accuracy" is then the denoising MSE.

**Failures.** Collectives run under the process group's timeout. Processes started here (the
``--nproc`` launcher, :func:`init_from_env`) pass ``timeout=`` to ``init_process_group``
(``SOPHON_FAST_DIST_TIMEOUT`` seconds, default 1800); torchrun users who initialise the group
themselves should pass one too. A rank that dies makes the others' next collective fail
(gloo: at once, "connection closed"; a rank that hangs: after the timeout), and they raise
:class:`DistributedError` naming the collective, the outer step and the remedy (``resume``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from sophon_fast.engine.optimizers import state_dtype

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedContext",
    "DistributedError",
    "current",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
    "owns",
    "rank_and_world",
]

DEFAULT_TIMEOUT_S = 1800.0
START_METHOD = "spawn"  # of launch(); "forkserver" with preloaded modules starts ranks faster
_TIMEOUT_ENV = "SOPHON_FAST_DIST_TIMEOUT"
_timeout_s: float | None = None  # the timeout this module passed to init_process_group, if it did


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout or disagrees on the run."""


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (any world size)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0, and in a process without a process group."""
    return rank_and_world()[0] == 0


def owns(unit: int, rank: int, world: int) -> bool:
    """Whether work unit ``unit`` (0-based, in draw order) runs on ``rank`` of ``world``."""
    return unit % world == rank


def current() -> DistributedContext | None:
    """The context for an initialised process group of more than one rank, else None."""
    rank, world = rank_and_world()
    if world <= 1:
        return None
    return DistributedContext(rank, world)


def _timeout_from_env(timeout_s: float | None) -> float:
    if timeout_s is None:
        raw = os.environ.get(_TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0") from None
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def _backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA devices, gloo otherwise (None: the CLI's default, where the model is: CPU)."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def _init(backend: str, timeout_s: float, **kwargs) -> None:
    import torch.distributed as dist

    global _timeout_s
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
    )
    _timeout_s = timeout_s


def init_from_env(
    *, device: str | torch.device | None = None, timeout_s: float | None = None
) -> bool:
    """Initialise the default process group from torchrun's environment, if it set one up.

    Does nothing (returns False) when a group already exists or ``WORLD_SIZE`` is unset or 1.
    Otherwise picks NCCL for a CUDA ``device`` (and selects ``cuda:LOCAL_RANK``) or gloo, and
    passes ``timeout`` so that a dead rank raises instead of hanging.

    Args:
        device: the run's device (None: gloo).
        timeout_s: collective timeout in seconds; None reads ``SOPHON_FAST_DIST_TIMEOUT``
            (default 1800).

    Returns:
        True when this call initialised the group.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = _backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init(backend, _timeout_from_env(timeout_s))
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    args: tuple,
    world: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int | None,
) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    _init(backend, timeout_s, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(*args)
        dist.barrier()  # all ranks past their last collective before any group is torn down
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
    start_method: str | None = None,
) -> None:
    """Run ``fn(*args)`` in ``nprocs`` spawned local processes that share one process group.

    Each process gets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and an initialised default group
    (NCCL on ``cuda:RANK`` for CUDA devices, else gloo with ``cpu_count // nprocs`` threads),
    rendezvous on a free 127.0.0.1 port, and the collective timeout. ``fn`` must be picklable (a
    module-level function).

    Args:
        fn: the work of one rank.
        nprocs: number of processes (>= 1).
        args: positional arguments of ``fn``.
        device: the run's device (picks the backend).
        timeout_s: collective timeout in seconds; None reads ``SOPHON_FAST_DIST_TIMEOUT``
            (default 1800).
        start_method: ``"spawn"`` or ``"forkserver"``; None = ``START_METHOD`` ("spawn").

    Raises:
        ValueError: ``nprocs < 1``, more CUDA processes than devices, a bad timeout.
        DistributedError: a process failed (its error and traceback are in the message); the
            others were stopped.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs: expected an int >= 1, got {nprocs!r}")
    timeout_s = _timeout_from_env(timeout_s)
    backend = _backend_for(device)
    if backend == "nccl" and nprocs > torch.cuda.device_count():
        raise ValueError(
            f"nprocs={nprocs}: expected at most one process per CUDA device "
            f"({torch.cuda.device_count()} visible)"
        )
    threads = None if backend == "nccl" else max(1, (os.cpu_count() or 1) // nprocs)
    try:
        mp.start_processes(
            _worker,
            args=(fn, args, nprocs, free_port(), backend, timeout_s, threads),
            nprocs=nprocs,
            join=True,
            start_method=start_method or START_METHOD,
        )
    except ProcessException as error:
        raise DistributedError(
            f"{nprocs}-process run failed: {error}; the other processes were stopped"
        ) from error


class DistributedContext:
    """Collectives of a data-parallel protection run or evaluation (see the module docstring).

    Attributes:
        rank / world: this process's rank and the world size (> 1).
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.step: int | None = None
        self._warned_idle = False

    # ------------------------------------------------------------------ collectives
    def _fail(self, what: str, error: BaseException) -> DistributedError:
        timeout = f"{_timeout_s:g} s" if _timeout_s is not None else "the process group's"
        at = f" at outer step {self.step + 1}" if self.step is not None else ""
        return DistributedError(
            f"rank {self.rank} of {self.world}: the {what}{at} failed: another rank died or did "
            f"not reach it within the timeout ({timeout}). Check the other ranks' output, then "
            f"rerun with resume=True (`sophon-fast protect --resume`) to continue from the last "
            f"complete checkpoint. Cause: {type(error).__name__}: {error}"
        )

    def all_reduce_(self, buffer: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """In-place ``all_reduce`` (sum or max) of one tensor; failures raise DistributedError."""
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        try:
            dist.all_reduce(buffer, op=reduce_op)
        except Exception as error:  # gloo / NCCL raise RuntimeError subclasses
            raise self._fail(f"all_reduce of the {what}", error) from error
        return buffer

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order; failures raise DistributedError."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, value)
        except Exception as error:
            raise self._fail(f"all_gather of the {what}", error) from error
        return gathered

    def broadcast_(self, tensor: torch.Tensor, what: str) -> None:
        """In-place broadcast from rank 0; failures raise DistributedError."""
        import torch.distributed as dist

        try:
            dist.broadcast(tensor, src=0)
        except Exception as error:
            raise self._fail(f"broadcast of the {what}", error) from error

    # ------------------------------------------------------------------ protect()
    def prepare(self, run) -> None:
        """Check that every rank runs the same configuration from the same state, then copy
        rank 0's weights and statistics to every rank (as DistributedDataParallel does).

        Raises:
            DistributedError: the ranks differ in config, step, data or generator state.
            ValueError: an NTR batch smaller than the world size.
        """

        def digest(tensor: torch.Tensor) -> str:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            return hashlib.sha256(data.tobytes()).hexdigest()[:16]

        mine = {
            "config": json.dumps(run.config.to_dict(), sort_keys=True),
            "step": run.step,
            "generator": digest(run.generator.get_state()),
            "restricted": [tuple(run.restricted[0].shape), digest(run.restricted[1])],
            "original": [tuple(run.original[0].shape), digest(run.original[1])],
            "engine": run.engine.name,
        }
        everyone = self.all_gather_object(mine, "run description")
        for rank, theirs in enumerate(everyone):
            differ = sorted(k for k in mine if theirs[k] != everyone[0][k])
            if differ:
                raise DistributedError(
                    f"rank {rank} of {self.world} differs from rank 0 in {differ}: every rank must run "
                    "protect() with the same config, data, seed and checkpoint"
                )
        if run.config.ntr_steps and run.config.batch_size < self.world:
            raise ValueError(
                f"ProtectConfig.batch_size={run.config.batch_size} is smaller than the world size "
                f"{self.world}: every rank needs at least one row of each NTR batch"
            )
        for tensor in _state_tensors(run.engine):
            with torch.no_grad():
                self.broadcast_(tensor.data, "initial weights")

    def simulate(
        self, engine, draw: Callable[[], Any], simulations: int
    ) -> tuple[torch.Tensor, torch.Tensor, Any, list]:
        """Draw ``simulations`` simulations (all ranks), run this rank's units, average over all.

        Args:
            engine: FastEngine or ReferenceEngine.
            draw: returns the next :class:`~sophon_fast.engine.sampling.SimulationDraw`.
            simulations: draws per meta step.

        Returns:
            (mean loss (), mean accuracy (), mean meta-gradient in the engine's form, the
            adversaries of every draw in draw order).
        """
        partial, loss, accuracy = None, None, None
        unit, adversaries = 0, []
        for _ in range(simulations):
            sim = draw()
            adversaries.extend(sim.adversaries)
            for adversary in sim.adversaries:
                if owns(unit, self.rank, self.world):
                    l_i, a_i, g_i = engine.simulate(
                        sim.batches, sim.adapt_masks, sim.eval_masks, sim.head_values, adversary
                    )
                    flat = _flatten(engine, g_i)
                    partial = flat if partial is None else partial + flat
                    loss = l_i if loss is None else loss + l_i
                    accuracy = a_i if accuracy is None else accuracy + a_i
                elif hasattr(engine, "skip_simulation"):  # generation: draw the unit's noise
                    engine.skip_simulation(sim.batches)
                unit += 1
            del sim
        if partial is None:  # more ranks than units: contribute zeros
            if not self._warned_idle:
                warnings.warn(
                    f"{unit} simulation(s) per meta step on {self.world} ranks: rank {self.rank} is idle; "
                    f"set ProtectConfig.simulations to a multiple of {self.world}",
                    stacklevel=3,
                )
                self._warned_idle = True
            partial = torch.zeros(
                _grad_numel(engine), dtype=_grad_dtype(engine), device=_device(engine)
            )
            loss = accuracy = torch.zeros((), dtype=partial.dtype, device=partial.device)
        buffer = torch.cat(
            [partial.reshape(-1), loss.reshape(1).to(partial), accuracy.reshape(1).to(partial)]
        )
        self.all_reduce_(buffer, "meta-gradient")
        buffer /= unit
        return buffer[-2], buffer[-1], _unflatten(engine, buffer[:-2]), adversaries

    def ntr_for(self, engine) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``engine.ntr_step``'s data-parallel replacement (:meth:`ntr_step` bound to ``engine``)."""
        return lambda x, y: self.ntr_step(engine, x, y)

    def ntr_step(self, engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One NTR step on this rank's shard of the batch, gradients summed over ranks.

        The engine's own ``ntr_step`` runs on the shard (so its speed options apply); its
        ``reduce`` hook scales the shard's mean-CE gradient and loss by ``n_shard / n_batch``
        and sums them over the ranks with ONE ``all_reduce`` before the NTR Adam step. A
        generation engine first turns the whole batch into its inputs and targets
        (``ntr_inputs``: the noise of every row, drawn on every rank) and steps on the shard of
        those (``ntr_step_on``).

        Returns:
            () the full batch's mean loss (as the single-process step reports it).
        """
        step = engine.ntr_step
        if hasattr(engine, "ntr_inputs"):
            x, y = engine.ntr_inputs(x, y)
            step = engine.ntr_step_on
        n = y.shape[0]
        index = torch.arange(self.rank, n, self.world, device=y.device)
        weight = index.numel() / n

        def reduce(grads: list[torch.Tensor], loss: torch.Tensor):
            dtype = grads[0].dtype
            buffer = torch.cat(
                [g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(dtype)]
            )
            buffer *= weight
            self.all_reduce_(buffer, "NTR gradient")
            out, offset = [], 0
            for g in grads:
                out.append(buffer[offset : offset + g.numel()].view_as(g).to(g.dtype))
                offset += g.numel()
            return out, buffer[-1]

        return step(x.index_select(0, index), y.index_select(0, index), reduce=reduce)

    def sync_statistics(self, engine) -> None:
        """BatchNorm rule: average the floating-point buffers over ranks, max the counters."""
        floats, counters = _buffers(engine)
        with torch.no_grad():
            if floats:
                flat = torch.cat([b.reshape(-1) for b in floats])
                self.all_reduce_(flat, "BatchNorm statistics")
                flat /= self.world
                _copy_back(floats, flat)
            if counters:
                flat = torch.cat([b.reshape(-1) for b in counters])
                self.all_reduce_(flat, "BatchNorm counters", op="max")
                _copy_back(counters, flat)

    def agree_stop(self, stopped_by: str | None) -> str | None:
        """Stop on every rank when any rank's callbacks or guard stopped (one tiny all_reduce)."""
        flag = torch.tensor([0.0 if stopped_by is None else 1.0])
        if _backend_name() == "nccl":
            flag = flag.cuda()
        self.all_reduce_(flag, "stop flag", op="max")
        if flag.item() > 0 and stopped_by is None:
            return "callback"
        return stopped_by

    # ------------------------------------------------------------------ evaluate()
    def spread(
        self,
        items: Sequence[Any],
        run: Callable[[list[Any]], list[Any]],
        what: str,
        key: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """Run ``items[i]`` for ``i % world == rank`` here; every rank gets all results.

        Args:
            items: the work (e.g. evaluate()'s cell specs), the same list on every rank.
            run: runs a list of this rank's items and returns one result per item.
            what: name for error messages.
            key: when given, ``run`` may return its results in any order: result ``r`` belongs
                to the item with ``key(item) == key(r)``; None = ``run`` keeps the items' order.

        Returns:
            The results of every item, in ``items`` order.
        """
        mine = [item for i, item in enumerate(items) if owns(i, self.rank, self.world)]
        results = run(mine)
        if len(results) != len(mine):
            raise RuntimeError(f"{what}: {len(mine)} items gave {len(results)} results")
        if key is not None:
            by_key = {key(result): result for result in results}
            results = [by_key[key(item)] for item in mine]
        gathered = self.all_gather_object(results, what)
        merged: list[Any] = [None] * len(items)
        for rank, part in enumerate(gathered):
            for j, result in enumerate(part):
                merged[rank + j * self.world] = result
        return merged


# ---------------------------------------------------------------------- engine adapters


def _backend_name() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def _params(engine) -> list[torch.Tensor]:
    return [engine.flat.params] if engine.name == "fast" else list(engine.params)


def _device(engine) -> torch.device:
    return _params(engine)[0].device


def _grad_numel(engine) -> int:
    return sum(p.numel() for p in _params(engine))


def _grad_dtype(engine) -> torch.dtype:
    if engine.name == "fast":
        return state_dtype(engine.flat.params.dtype)
    return engine.params[0].dtype


def _flatten(engine, grad) -> torch.Tensor:
    if isinstance(grad, dict):
        return torch.cat([grad[name].reshape(-1) for name, _ in engine.model.named_parameters()])
    return grad.reshape(-1)


def _unflatten(engine, flat: torch.Tensor):
    if engine.name == "fast":
        return flat
    out, offset = {}, 0
    for name, param in engine.model.named_parameters():
        out[name] = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    return out


def _buffers(engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if engine.name == "fast":
        floats = [engine.flat.stats] if engine.flat.stats.numel() else []
        counters = [engine.flat.counters] if engine.flat.counters.numel() else []
        return floats, counters
    buffers = [b for b in engine.model.buffers() if b.numel()]
    return (
        [b for b in buffers if b.is_floating_point()],
        [b for b in buffers if not b.is_floating_point()],
    )


def _state_tensors(engine) -> list[torch.Tensor]:
    floats, counters = _buffers(engine)
    return _params(engine) + floats + counters


def _copy_back(targets: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in targets:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
