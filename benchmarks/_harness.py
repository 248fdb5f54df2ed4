"""Shared benchmark harness: warm-up, interleaved repeats, medians, peak memory, table, CSV, JSON.

Every suite compares an implementation against a baseline on the same device in the same run.
Repeats of the variants being compared are interleaved (A, B, A, B, ...) so that a change in
machine load hits both alike, and each repeat runs enough iterations to last >= ``min_repeat_s``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from sophon_fast import _backend, cpu_cache

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Record:
    """One benchmark row: an implementation against its baseline, on one case."""

    suite: str
    case: str
    impl: str
    baseline: str
    median_ms: float
    min_ms: float
    max_ms: float
    baseline_median_ms: float
    speedup: float
    repeats: int
    peak_mem_mb: float | None = None
    baseline_peak_mem_mb: float | None = None
    memory_ratio: float | None = None
    bytes_per_call: int | None = None
    gbps: float | None = None
    roofline_frac: float | None = None
    ceiling: str = ""
    device: str = ""
    torch: str = ""
    triton: str = ""
    git_sha: str = ""
    date: str = ""
    threads: int = 0


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """The fields every row carries: device, versions, commit, date, threads."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": torch.get_num_threads(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn: Callable[[], object], device: torch.device, min_repeat_s: float) -> int:
    """Iterations per repeat so that one repeat lasts about ``min_repeat_s``."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(min_repeat_s / once))


def _time_repeat(fn, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / iters


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 7,
    min_repeat_s: float = 0.05,
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, ``repeats`` samples each, interleaved."""
    if repeats < 5:
        raise ValueError(f"repeats must be >= 5 for a meaningful median, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    iters = {name: _calibrate(fn, device, min_repeat_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_repeat(fn, iters[name], device))
    return samples


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call adds above what was live before it (MiB).

    CUDA: max_memory_allocated. CPU: the kernel's resident-set high-water mark, reset right
    before the call (/proc/self/clear_refs), so a peak inside a C++ kernel that holds the GIL is
    seen too; None where Linux's /proc interface is missing. The extension's CPU buffer cache is
    emptied first, else outputs it hands back out would not show as new memory.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    cpu_cache.empty()
    if not Path("/proc/self/statm").exists() or not _reset_peak_rss():
        return None
    base = _rss_bytes()
    fn()
    return max(0, _peak_rss_bytes() - base) / 2**20


def fused_backends(device: torch.device) -> list[str]:
    """The compiled fused backends that run on ``device`` (cuda and compiled Triton on a GPU,
    cpu on the CPU); interpreted Triton is left out: its timings say nothing about a kernel."""
    return [
        name
        for name in ("cuda", "cpu", "triton")
        if _backend.why_unavailable(name, device) is None
        and not (name == "triton" and _backend.triton_mode() == "interpreted")
    ]


def copy_bandwidth_gbps(device: torch.device, n_bytes: int, repeats: int = 7) -> float:
    """Measured large-copy bandwidth (read + write bytes per second, GB/s) on ``device``."""
    n = max(1, n_bytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats=repeats)["copy"]
    return 2 * n * 4 / (statistics.median(samples) * 1e-3) / 1e9


def make_record(
    suite: str,
    case: str,
    impl: str,
    baseline: str,
    samples: dict[str, list[float]],
    env: dict,
    *,
    peak_mem: dict[str, float | None] | None = None,
    bytes_per_call: int | None = None,
    copy_gbps: float | None = None,
    ceiling: str = "",
) -> Record:
    """Build a row for ``impl`` against ``baseline`` from interleaved samples."""
    impl_ms = statistics.median(samples[impl])
    base_ms = statistics.median(samples[baseline])
    mem = peak_mem or {}
    impl_mem, base_mem = mem.get(impl), mem.get(baseline)
    gbps = bytes_per_call / (impl_ms * 1e-3) / 1e9 if bytes_per_call else None
    return Record(
        suite=suite,
        case=case,
        impl=impl,
        baseline=baseline,
        median_ms=impl_ms,
        min_ms=min(samples[impl]),
        max_ms=max(samples[impl]),
        baseline_median_ms=base_ms,
        speedup=base_ms / impl_ms,
        repeats=len(samples[impl]),
        peak_mem_mb=impl_mem,
        baseline_peak_mem_mb=base_mem,
        memory_ratio=(impl_mem / base_mem) if impl_mem is not None and base_mem else None,
        bytes_per_call=bytes_per_call,
        gbps=gbps,
        roofline_frac=(gbps / copy_gbps) if gbps is not None and copy_gbps else None,
        ceiling=ceiling,
        **env,
    )


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(records: list[Record]) -> str:
    """A fixed-width table of the records, one line each."""
    headers = [
        "case",
        "impl",
        "vs",
        "ms",
        "base ms",
        "speedup",
        "GB/s",
        "roofline",
        "peak MiB",
        "mem ratio",
    ]
    rows = [
        [
            r.case,
            r.impl,
            r.baseline,
            _fmt(r.median_ms, 3),
            _fmt(r.baseline_median_ms, 3),
            _fmt(r.speedup) + "x",
            _fmt(r.gbps, 1),
            _fmt(r.roofline_frac),
            _fmt(r.peak_mem_mb, 1),
            _fmt(r.memory_ratio),
        ]
        for r in records
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def append_csv(records: list[Record], path: Path) -> None:
    """Append rows to ``path`` (header written once); results are kept as data in git."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(Record)]
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for record in records:
            writer.writerow(dataclasses.asdict(record))


def write_json(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=2) + "\n")
