"""Peak memory of protect() against the simulated horizon K: `python benchmarks/memory_horizon.py [K ...]`.

Each K runs in a fresh process (peak RSS is per process): two outer steps of the official run
(first order, ICE, SGD 1e-4) on the small CNN, MNIST-5k -> scikit-learn digits, one thread, and
prints the process's peak resident memory and the seconds per outer step. A first-order
simulation keeps one evaluation graph alive and its K batches as indices, so the peak should not
grow with K. ``--order 2 --truncate W`` measures truncated second order (memory grows with W).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(inner_steps: int, order: int, truncate: int | None) -> dict:
    import torch

    from sophon_fast.api import protect
    from sophon_fast.config import ProtectConfig
    from sophon_fast.data.builtin import load_builtin
    from sophon_fast.models.classifiers import SmallCNN

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    original, restricted = load_builtin("mnist5k", "train"), load_builtin("sklearn_digits", "train")
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, image_size=28)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = ProtectConfig(
        inner_steps=inner_steps, outer_steps=2, order=order, truncate=truncate,
        eval_every=None, guard_threshold=None,
    )  # fmt: skip
    started = time.perf_counter()
    protect(model, original, restricted, config, progress=False)
    return {
        "inner_steps": inner_steps,
        "order": order,
        "truncate": truncate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_protect_mb": before,
        "seconds_per_outer_step": (time.perf_counter() - started) / 2,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inner_steps", nargs="*", type=int, default=[50, 200])
    parser.add_argument("--order", type=int, default=1, choices=(1, 2))
    parser.add_argument("--truncate", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.inner_steps[0], args.order, args.truncate)))
        return 0
    print("K    order truncate  peak RSS MB  before protect MB  s/outer step")
    for k in args.inner_steps:
        command = [sys.executable, __file__, str(k), "--order", str(args.order), "--child"]
        if args.truncate is not None:
            command += ["--truncate", str(args.truncate)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(
            f"{k:<4} {args.order:<5} {str(args.truncate):<9} {row['peak_rss_mb']:>11.0f} "
            f"{row['rss_before_protect_mb']:>18.0f} {row['seconds_per_outer_step']:>13.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
