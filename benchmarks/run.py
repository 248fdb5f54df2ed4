"""Benchmark runner: `python benchmarks/run.py ops|e2e|efficacy [--quick] [--json PATH] [--device cuda]`.

``ops`` and ``e2e`` run every bench_<op>.py of the suite on one device, print a table, append rows
to benchmarks/results/<suite>.csv (device, torch/triton versions, git SHA, date) and optionally
write the records as JSON. Each row compares an implementation with its eager baseline from the
same run (median of >= 5 interleaved repeats) and records peak memory.

``efficacy`` is not a suite of timed rows: it protects models and attacks them, case by case
(benchmarks/efficacy.py, which documents its own options: ``run.py efficacy --help``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Passive OpenMP waits: spinning worker threads slow everything else down when the two cores are
# shared (measured 7x on an elementwise op under load). Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402
import efficacy  # noqa: E402
import torch  # noqa: E402

SUITES = {
    "ops": [
        "bench_flat_sgd_step",
        "bench_losses_batch_norm",
        "bench_flat_momentum",
        "bench_flat_adam",
        "bench_flat_rmsprop",
        "bench_flat_adagrad",
        "bench_flat_adadelta",
        "bench_bn_relu_pool",
        "bench_relu_pool",
    ],
    "e2e": ["bench_e2e"],  # one protect() outer step, fast vs reference engine
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "efficacy":
        return efficacy.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted([*SUITES, "efficacy"]), help="which suite to run")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (still >= 5)")
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=_harness.RESULTS_DIR,
        help="where <suite>.csv is appended",
    )
    parser.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    env = _harness.environment(device)
    # A copy bigger than any cache: 256 MiB (CPU) or 1 GiB (GPU) of traffic per call.
    copy_gbps = _harness.copy_bandwidth_gbps(
        device, (512 if device.type == "cuda" else 128) * 2**20
    )
    print(
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"commit {env['git_sha']} | {env['threads']} threads | copy {copy_gbps:.1f} GB/s"
    )
    records = []
    for module_name in SUITES[args.suite]:
        module = importlib.import_module(module_name)
        records += module.run(device, args.quick, env, copy_gbps)
    print(_harness.format_table(records))
    if not args.no_csv:
        path = args.results_dir / f"{args.suite}.csv"
        _harness.append_csv(records, path)
        print(f"appended {len(records)} rows to {path}")
    if args.json:
        _harness.write_json(records, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
