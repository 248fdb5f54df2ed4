"""Data-parallel speed-up of protect(): one process vs ``--nproc`` processes, same run.

    python benchmarks/bench_distributed.py [--nproc 2] [--simulations 2] [--steps 4] [--device cpu]

Protects a SmallCNN (28x28, random weights: timing only) on random data with ``simulations``
fine-tunings per meta step, once in this process (all cores to it) and once over ``nproc`` local
processes (gloo on the CPU with cores / nproc threads each, NCCL with one GPU each). Reports the
median seconds per outer step (the history's ``seconds``; process start-up and the first step,
which pays one-off imports, excluded) and the ratio. Both runs draw the same simulations, so they
compute the same weights up to rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _run(args, out: str | None) -> list[float]:
    from sophon_fast.api import ProtectConfig, protect
    from sophon_fast.distributed import rank_and_world
    from sophon_fast.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, image_size=28)
    g = torch.Generator().manual_seed(0)
    original = (torch.rand(600, 1, 28, 28, generator=g), torch.randint(0, 10, (600,), generator=g))
    restricted = (
        torch.rand(600, 1, 28, 28, generator=g),
        torch.randint(0, 10, (600,), generator=g),
    )
    config = ProtectConfig(
        inner_steps=args.inner_steps,
        outer_steps=args.steps + 1,
        simulations=args.simulations,
        guard_threshold=None,
        eval_size=300,
    )
    result = protect(model, original, restricted, config, device=args.device, progress=False)
    seconds = [r["seconds"] for r in result.history[1:]]
    if out is not None and rank_and_world()[0] == 0:
        Path(out).write_text(json.dumps(seconds))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--simulations", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument(
        "--steps", type=int, default=4, help="timed outer steps (after one warm-up)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from sophon_fast.distributed import launch

    started = time.perf_counter()
    one = _run(args, None)
    one_wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        started = time.perf_counter()
        launch(_run, args.nproc, (args, out), device=args.device)
        many_wall = time.perf_counter() - started
        many = json.loads(Path(out).read_text())
    m1, mn = statistics.median(one), statistics.median(many)
    print(
        f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; SmallCNN, simulations={args.simulations}, "
        f"inner_steps={args.inner_steps}, batch 150"
    )
    print(
        f"1 process:            {m1:.3f} s / outer step (median of {len(one)}), {one_wall:.1f} s wall"
    )
    print(
        f"{args.nproc} processes:          {mn:.3f} s / outer step (median of {len(many)}), "
        f"{many_wall:.1f} s wall with start-up"
    )
    print(f"speed-up per step:    {m1 / mn:.2f}x")


if __name__ == "__main__":
    main()
