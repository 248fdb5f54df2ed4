"""Environment step of benchmarks/gpu/run.sh: what the machine has, as checks with verdicts.

    python benchmarks/gpu/environment.py --out environment.json [--dry-run]

Checks (GPU run; in a dry run the GPU ones are recorded as skipped): nvidia-smi answers, torch
imports and sees a CUDA device, triton imports, nvcc and ninja run, the CUDA headers the
extension build includes are present (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h, and cublas_v2.h /
cusparse.h, which torch's ATen/cuda/CUDAContext.h pulls in), pytest, pytest-xdist and
pytest-timeout import. Headers found only outside the toolkit (pip's nvidia-* packages) are
listed in ``cuda_include_dirs`` so the build step can add them to CPATH.

Exit status: 0 when every check passed or was skipped, 1 otherwise. Python's standard library
only at the top level, so the file runs (and reports) even where torch does not import.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HEADERS = ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "cublas_v2.h", "cusparse.h")


def _run(command: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, f"{command[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(command)}: no answer within {timeout:g} s"
    return done.returncode, (done.stdout + done.stderr).strip()


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
        return None if isinstance(error, ImportError) else f"import failed: {error}"


def _find_cuda_home() -> Path | None:
    """The toolkit the build will use, by setup.py's order (CUDA_HOME / CUDA_PATH, nvcc's real
    path, /usr/local/cuda; setup.py also follows wrapper scripts, which this does not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").is_file():
            return home
    default = Path("/usr/local/cuda")
    return default if (default / "include" / "cuda_runtime.h").is_file() else None


def _header_search(cuda_home: Path | None) -> tuple[dict[str, str | None], list[str]]:
    """header -> where it was found (None: nowhere); extra include dirs outside the toolkit."""
    dirs = [cuda_home / "include"] if cuda_home else []
    dirs += [cuda_home / "targets" / "x86_64-linux" / "include"] if cuda_home else []
    site = [Path(p) for p in sys.path if p.endswith("site-packages")]
    for base in site:
        nvidia = base / "nvidia"
        if nvidia.is_dir():
            dirs += sorted(nvidia.glob("*/include")) + sorted(nvidia.glob("cu*/include"))
    found: dict[str, str | None] = {}
    extra: list[str] = []
    for header in HEADERS:
        where = next((d for d in dirs if (d / header).is_file()), None)
        found[header] = None if where is None else str(where)
        in_toolkit = (
            cuda_home is not None and where is not None and str(where).startswith(str(cuda_home))
        )
        if where is not None and not in_toolkit and str(where) not in extra:
            extra.append(str(where))
    return found, extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    gpu = not args.dry_run
    checks: list[dict] = []
    info: dict = {"python": platform.python_version(), "executable": sys.executable,
                  "platform": platform.platform(), "cpu_count": os.cpu_count()}  # fmt: skip

    def check(name, ok, detail, *, gpu_only=False, error=None):
        if gpu_only and not gpu:
            verdict = "skipped"
            error = "dry run: no GPU expected" + (f" ({detail})" if detail else "")
        else:
            verdict = "passed" if ok else "failed"
        record = {"name": f"env/{name}", "verdict": verdict, "detail": detail}
        if verdict != "passed" and (error or not ok):
            record["error"] = error or detail
        checks.append(record)
        print(f"{record['name']}: {verdict} - {detail}", flush=True)

    rc, text = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                     "--format=csv,noheader"])  # fmt: skip
    info["nvidia_smi"] = text
    check("nvidia_smi", rc == 0, text, gpu_only=True)

    started = time.perf_counter()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        cuda_ok = torch.cuda.is_available()
        if cuda_ok:
            props = torch.cuda.get_device_properties(0)
            info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "memory_gib": round(props.total_memory / 2**30, 1),
                              "multiprocessors": props.multi_processor_count}  # fmt: skip
        check("torch", True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), import "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        check("torch_cuda_device", cuda_ok, str(info.get("device", "torch.cuda.is_available() is False")),
              gpu_only=True)  # fmt: skip
    except Exception as error:  # noqa: BLE001
        check("torch", False, f"import torch failed: {type(error).__name__}: {error}")

    triton = _version("triton")
    info["triton"] = triton
    check("triton", triton is not None and not triton.startswith("import failed"),
          f"triton {triton or 'not installed'}")  # fmt: skip

    nvcc_rc, nvcc = _run(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else nvcc
    check("nvcc", nvcc_rc == 0, info["nvcc"], gpu_only=True)
    ninja_rc, ninja = _run(["ninja", "--version"])
    info["ninja"] = ninja
    check("ninja", ninja_rc == 0, f"ninja {ninja}", gpu_only=True)

    cuda_home = _find_cuda_home()
    info["cuda_home"] = None if cuda_home is None else str(cuda_home)
    headers, extra = _header_search(cuda_home)
    info["cuda_headers"] = headers
    info["cuda_include_dirs"] = extra
    missing = [h for h, where in headers.items() if where is None]
    check("cuda_headers", not missing,
          f"CUDA_HOME {cuda_home}; " + (f"missing {', '.join(missing)}" if missing else "all found")
          + (f"; outside the toolkit: {', '.join(extra)}" if extra else ""), gpu_only=True)  # fmt: skip

    for module, name in (
        ("pytest", "pytest"),
        ("xdist", "pytest_xdist"),
        ("pytest_timeout", "pytest_timeout"),
    ):
        version = _version(module)
        info[name] = version
        # The dry run falls back to plain pytest without these plugins (CPU CI has neither).
        check(name, version is not None, f"{module} {version or 'not installed'}",
              gpu_only=module != "pytest")  # fmt: skip
    info["env"] = {k: os.environ.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
                                                  "CUDA_LAUNCH_BLOCKING", "TRITON_INTERPRET",
                                                  "CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "checks": checks}, indent=1) + "\n")
    return 0 if all(c["verdict"] != "failed" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
