"""End to end: one protect() outer step, engine="fast" against engine="reference".

One outer step is what :meth:`sophon_fast.engine.outer.ProtectionRun.outer_step` does: back up,
draw and run one fine-tuning simulation (K inner steps + evaluation), clip + meta Adam step, one
NTR step. Evaluation and the guard are off (``eval_every=0``), so the step is the algorithm only.
Both engines are built exactly as :func:`sophon_fast.protect` builds them (same seed, data,
adversary) and stepped in alternation (fast, reference, fast, ...): a change in machine load hits
both alike. Time per outer step: the median of >= 5 steps after one warm-up step each.

Peak memory above the post-setup baseline: each (case, engine) runs in a fresh subprocess that
builds the run, takes one warm-up step, then measures one step (CPU: the kernel's RSS high-water
mark, reset just before; CUDA: max_memory_allocated). The subprocess pins glibc's mmap and trim
thresholds (128 KiB) so freed tensors go back to the kernel; otherwise memory the warm-up step
freed would be reused without showing up in RSS, and whichever engine ran second would look free.

Outside baseline: TorchOpt's pure-Python MAML path (``torchopt.MetaSGD`` / ``MetaAdam`` on the
module, ``extract_state_dict`` / ``recover_state_dict`` around the simulation), order-2 cases
only (its native mode), when ``import torchopt`` works; rows record "not available" otherwise.
It is not a dependency.

Cases (the issue's list; names carry K and the batch; ``--quick`` uses the K in brackets):

=========================  ====================================================================
small_cnn k50 o1 sgd       SmallCNN 28x28x1, batch 150 (130 adapt / 20 eval), K=50 [5], order 1
small_cnn k5 o2 sgd/adam   same model and batch, K=5 [2], second order, SGD / Adam adversary
resnet18 32x32 k5 o1/o2    CIFAR ResNet-18, 32x32x3, batch 32 (28 / 4), K=5 [1], order 1 / 2
mlp k5 o2 sgd              MLP 784-256-256-10, batch 150, K=5, second order
=========================  ====================================================================

On CUDA the cases are the GPU check: ResNet-18 32x32, K=50 [10], batch 150, first order, as fast
(eager), fast + captured inner step, fast + bf16 autocast and reference; small CNN order 2 with
the whole simulation captured (records say whether capture worked or fell back to eager).
``SOPHON_E2E_CASES=small_cnn,mlp`` runs only the cases whose names contain one of the parts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _harness
import torch

SUITE = "e2e"
HERE = Path(__file__).resolve().parent
N_SAMPLES = 2000  # restricted and original pools; K=50 x 150 wraps around them, as real epochs do


@dataclasses.dataclass(frozen=True)
class Case:
    """One e2e configuration."""

    name: str
    model: str  # key of MODEL_BUILDERS
    input_shape: tuple[int, ...]
    batch_size: int
    adapt_size: int
    inner_steps: int
    order: int
    adversary: tuple
    torchopt: bool = False  # also time TorchOpt's pure-Python MAML (order 2 only)
    variants: tuple[str, ...] = ("fast", "reference")  # keys of VARIANTS

    def config_kwargs(self) -> dict:
        return dict(
            inner_steps=self.inner_steps,
            batch_size=self.batch_size,
            adapt_size=self.adapt_size,
            order=self.order,
            adversaries=(self.adversary,),
            eval_every=0,
            guard_threshold=None,
            outer_steps=10**9,
        )


def _small_cnn():
    from sophon_fast.models import SmallCNN

    return SmallCNN(num_classes=10, in_channels=1, image_size=28)


def _resnet18():
    from sophon_fast.models import ResNet18CIFAR

    return ResNet18CIFAR(num_classes=10, in_channels=3)


def _mlp():
    from sophon_fast.models import MLP

    return MLP(in_features=784, hidden=(256, 256), num_classes=10)


MODEL_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet18,
    "mlp": _mlp,
}


def cases(quick: bool, device: torch.device | None = None) -> list[Case]:
    """The issue's cases for ``device``; ``quick`` shortens K (the names carry the sizes).

    CUDA: the GPU check of the issue, ResNet-18 at 32x32, K=50, batch 150, first order, with and
    without the captured inner step, plus the small CNN in order 2 with the whole simulation
    captured (does double backward capture?).
    """
    cnn = (1, 28, 28)
    if device is not None and device.type == "cuda":
        rn_k = 10 if quick else 50
        return [
            Case(f"resnet18 32x32 k{rn_k} b150 o1 sgd", "resnet18", (3, 32, 32), 150, 130, rn_k, 1, ("sgd", 1e-4), variants=("fast", "fast+graphs", "fast+bf16", "reference")),
            Case("small_cnn k5 b150 o2 sgd", "small_cnn", cnn, 150, 130, 5, 2, ("sgd", 1e-4), variants=("fast", "fast+graph-simulation", "reference")),
        ]  # fmt: skip
    k_long, k_short, rn_k = (5, 2, 1) if quick else (50, 5, 5)
    return [
        Case(f"small_cnn k{k_long} b150 o1 sgd", "small_cnn", cnn, 150, 130, k_long, 1, ("sgd", 1e-4)),
        Case(f"small_cnn k{k_short} b150 o2 sgd", "small_cnn", cnn, 150, 130, k_short, 2, ("sgd", 1e-4), True),
        Case(f"small_cnn k{k_short} b150 o2 adam", "small_cnn", cnn, 150, 130, k_short, 2, ("adam", 1e-4), True),
        Case(f"resnet18 32x32 k{rn_k} b32 o1 sgd", "resnet18", (3, 32, 32), 32, 28, rn_k, 1, ("sgd", 1e-4)),
        Case(f"resnet18 32x32 k{rn_k} b32 o2 sgd", "resnet18", (3, 32, 32), 32, 28, rn_k, 2, ("sgd", 1e-4)),
        Case("mlp k5 b150 o2 sgd", "mlp", cnn, 150, 130, 5, 2, ("sgd", 1e-4), True),
    ]  # fmt: skip


#: variant name -> (engine, engine_options): what each timed column runs.
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "fast": ("fast", None),
    "reference": ("reference", None),
    "torchopt": ("torchopt", None),
    "fast+graphs": ("fast", {"cuda_graphs": "inner"}),
    "fast+graph-simulation": ("fast", {"cuda_graphs": "simulation"}),
    "fast+bf16": ("fast", {"autocast": "bf16"}),
}


def _data(case: Case, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, *case.input_shape, generator=g)
    y = torch.randint(0, 10, (N_SAMPLES,), generator=g)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- TorchOpt engine
def torchopt_available() -> str | None:
    """None when TorchOpt imports, else why not."""
    try:
        import torchopt  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(error).__name__}: {error}"
    return None


def _torchopt_engine_class():
    """A ReferenceEngine whose simulation is TorchOpt's MAML loop (built lazily: optional)."""
    import torchopt

    from sophon_fast.reference.sophon import ReferenceEngine, load_bn, save_bn

    class TorchOptEngine(ReferenceEngine):
        name = "torchopt"

        def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
            if self.order != 2 or self.truncate is not None:
                raise ValueError("the TorchOpt baseline runs full second order only")
            model = self.model
            saved_bn = save_bn(model)
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            names = [n for n, _ in model.named_parameters()]
            params = [p for _, p in model.named_parameters()]
            if head_values:  # a clone of the head with the re-drawn values (identity edge kept)
                for name, value in head_values.items():
                    owner_name, _, attr = name.rpartition(".")
                    owner = model.get_submodule(owner_name) if owner_name else model
                    clone = owner._parameters[attr].clone()
                    with torch.no_grad():
                        clone.copy_(value.to(clone))
                    owner._parameters[attr] = clone
            if adversary.name == "sgd":
                inner = torchopt.MetaSGD(model, lr=adversary.lr)
            elif adversary.name == "adam":
                inner = torchopt.MetaAdam(
                    model, lr=adversary.lr, betas=adversary.hp["betas"], eps=adversary.hp["eps"]
                )
            else:
                raise ValueError(f"TorchOpt baseline: adversary {adversary.name!r} not wired")
            losses, total, correct = [], 0, 0
            for k, (x, y) in enumerate(batches):
                a, e = adapt_masks[k].to(x.device), eval_masks[k].to(x.device)
                inner.step(self.adapt_loss(model(x[a]), y[a]))
                logits = model(x[e])
                count = int(e.sum())
                losses.append(count * self.suppression_loss(logits, y[e]))
                correct = correct + (logits.detach().argmax(1) == y[e]).sum()
                total += count
            loss = sum(losses) / total
            grads = torch.autograd.grad(loss, params)
            torchopt.recover_state_dict(model, net_state)
            if self.restore_bn:
                load_bn(model, saved_bn)
            meta_grad = {n: g.detach() for n, g in zip(names, grads)}
            return loss.detach(), correct.to(loss.dtype) / total, meta_grad

    return TorchOptEngine


# ----------------------------------------------------------------------------- building runs
def build_run(case: Case, engine: str, device: torch.device, engine_options: dict | None = None):
    """A ProtectionRun built as protect() builds it; ``engine`` is fast / reference / torchopt."""
    from sophon_fast import api
    from sophon_fast.api import ProtectConfig
    from sophon_fast.engine.outer import ProtectionRun
    from sophon_fast.models import find_head

    torch.manual_seed(0)
    model = MODEL_BUILDERS[case.model]()
    kwargs = case.config_kwargs()
    if engine_options is not None:
        kwargs["engine_options"] = engine_options
    config = ProtectConfig(engine="reference" if engine == "torchopt" else engine, **kwargs)
    work = copy.deepcopy(model).to(device)
    work.train()
    if engine == "torchopt":
        cls = _torchopt_engine_class()
        base = api._make_engine(config, work)
        runner = cls.__new__(cls)
        runner.__dict__.update(base.__dict__)
    else:
        runner = api._make_engine(config, work)
    head = find_head(work, None) if config.reinit_head_resolved else None
    return ProtectionRun(
        engine=runner,
        config=config,
        restricted=_data(case, device, 1),
        original=_data(case, device, 2),
        original_eval=None,
        head=head,
    )


def _step(run, device: torch.device) -> None:
    run.outer_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_in_subprocess(
    case: Case, variant: str, device: torch.device, quick: bool
) -> float | None:
    """Peak MiB one outer step adds above the post-setup (post-warm-up) baseline, fresh process."""
    env = dict(os.environ)
    env.update(
        MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", OMP_WAIT_POLICY="PASSIVE"
    )
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory", case.name, variant,
        "--device", str(device),
    ] + (["--quick"] if quick else [])  # fmt: skip
    try:
        out = subprocess.run(
            command, env=env, capture_output=True, text=True, check=True, timeout=1800
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        stderr = getattr(error, "stderr", "") or ""
        print(f"  memory measurement failed for {case.name} / {variant}: {stderr[-500:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _build_variant(case: Case, variant: str, device: torch.device):
    engine, options = VARIANTS[variant]
    return build_run(case, engine, device, options)


def _memory_main(case_name: str, variant: str, device: torch.device, quick: bool) -> None:
    torch.set_flush_denormal(True)
    case = {c.name: c for c in cases(quick, device)}[case_name]
    run = _build_variant(case, variant, device)
    _step(run, device)  # warm-up: optimizer states, allocator pools, lazy inits, graph capture
    peak = _harness.peak_memory_mb(lambda: _step(run, device), device)
    print(json.dumps({"peak_mb": peak}))


# ----------------------------------------------------------------------------- timing
def time_case(case: Case, device: torch.device, repeats: int, variants: list[str]):
    """ms per outer step, interleaved across variants, one warm-up step each.

    Returns:
        (samples: variant -> [ms], runs: variant -> ProtectionRun).
    """
    runs = {variant: _build_variant(case, variant, device) for variant in variants}
    for run in runs.values():
        _step(run, device)
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, run in runs.items():
            start = time.perf_counter()
            _step(run, device)
            samples[variant].append((time.perf_counter() - start) * 1e3)
    return samples, runs


def _options_note(order: int, device: torch.device) -> str:
    from sophon_fast.engine.options import describe_defaults

    return describe_defaults(order, device)


def _graph_note(run) -> str:
    """Whether the engine's CUDA graphs were captured (a failed capture falls back to eager)."""
    graphs = getattr(run.engine, "_graphs", {})
    if not graphs:
        return ""
    ok = all(g is not None for g in graphs.values())
    return "; graph captured" if ok else "; capture FAILED, ran eagerly"


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    repeats = 5 if quick else 7
    why_no_torchopt = torchopt_available()
    if why_no_torchopt is not None:
        print(f"TorchOpt baseline: not available ({why_no_torchopt})")
    records = []
    only = os.environ.get("SOPHON_E2E_CASES")  # comma-separated substrings of case names
    for case in cases(quick, device):
        if only and not any(part in case.name for part in only.split(",")):
            continue
        variants = list(case.variants)
        if case.torchopt and why_no_torchopt is None:
            variants.append("torchopt")
        started = time.perf_counter()
        samples, runs = time_case(case, device, repeats, variants)
        notes = {v: _graph_note(r) for v, r in runs.items()}
        del runs
        peaks = {v: _memory_in_subprocess(case, v, device, quick) for v in variants}
        print(
            f"  {case.name}: "
            + ", ".join(f"{v} {statistics.median(samples[v]):.0f} ms / {peaks[v]} MiB" for v in variants)
            + f" ({time.perf_counter() - started:.0f} s)"
        )  # fmt: skip
        defaults = "fast defaults: " + _options_note(case.order, device)
        for impl in variants:
            if impl == "reference":
                continue
            if impl == "torchopt":
                ceiling = "TorchOpt 0.7 pure-Python MetaOptimizer MAML"
            else:
                extra = VARIANTS[impl][1]
                ceiling = defaults + (f"; options {extra}" if extra else "") + notes[impl]
            records.append(
                _harness.make_record(
                    SUITE,
                    case.name,
                    impl,
                    "reference",
                    samples,
                    env,
                    peak_mem=peaks,
                    ceiling=ceiling,
                )  # fmt: skip
            )
        if case.torchopt and why_no_torchopt is not None:
            records.append(
                dataclasses.replace(
                    records[-1],
                    impl="torchopt",
                    median_ms=float("nan"),
                    min_ms=float("nan"),
                    max_ms=float("nan"),
                    speedup=float("nan"),
                    peak_mem_mb=None,
                    memory_ratio=None,
                    ceiling=f"not available: {why_no_torchopt}"[:200],
                )
            )
    return records


if __name__ == "__main__":  # the memory subprocess: bench_e2e.py --memory CASE VARIANT
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "VARIANT"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    _memory_main(args.memory[0], args.memory[1], torch.device(args.device), args.quick)
