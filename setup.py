"""Build script: the sophon_fast._C extension (C++ CPU always, CUDA when possible).

Environment:
    SOPHON_FAST_NO_EXT=1     install pure Python (Triton + reference backends only).
    SOPHON_FAST_NO_CUDA=1    build the CPU extension only, even with a CUDA torch and nvcc.
    CUDA_HOME / CUDA_PATH    the CUDA toolkit to use (else found from nvcc, see _find_cuda_home).
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": A100 and H100).
    MAX_JOBS                 parallel compile jobs (read by torch's ninja build).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read_sources() -> tuple[list[str], list[str]]:
    """The one source list (csrc/sources.txt), split into (.cpp, .cu)."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for path in paths:
        if not (ROOT / path).is_file():
            raise FileNotFoundError(f"csrc/sources.txt lists {path}, which does not exist")
    return [p for p in paths if p.endswith(".cpp")], [p for p in paths if p.endswith(".cu")]


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _find_cuda_home() -> Path | None:
    """Locate the CUDA toolkit, robust to an `nvcc` on PATH that is a wrapper script.

    torch's own guess is dirname(dirname(which nvcc)), which is wrong when /usr/local/bin/nvcc is
    a shell script exec-ing the real compiler. Order: CUDA_HOME/CUDA_PATH, the real path of nvcc,
    absolute nvcc paths named inside a wrapper script, `nvcc --version`'s neighbours, /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(Path(os.environ[var])):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    candidates: list[Path] = []
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        candidates.append(real.parent.parent)
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if not head.startswith(b"\x7fELF"):
            text = head.decode("utf-8", errors="ignore")
            for match in re.findall(r"(/[^\s\"']+)/bin/nvcc\b", text):
                candidates.append(Path(match))
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if _is_toolkit(home):
            return home
    return None


def _extensions():
    if _flag("SOPHON_FAST_NO_EXT"):
        print("sophon_fast: SOPHON_FAST_NO_EXT=1, installing pure Python (Triton + reference)")
        return [], {}
    cuda_home = None if _flag("SOPHON_FAST_NO_CUDA") else _find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = str(cuda_home)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources, cu_sources = _read_sources()
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    # No -std here: torch's BuildExtension passes the standard its headers need (C++20 in 2.13).
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(
            f"sophon_fast: building CPU + CUDA extension (CUDA_HOME={cuda_home}, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        ext = CUDAExtension(
            "sophon_fast._C",
            sources=cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("SOPHON_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        why = "nvcc not found" if cuda_home is None else "torch has no CUDA"
        print(f"sophon_fast: building the CPU extension only ({why})")
        ext = CppExtension(
            "sophon_fast._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {
        "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    }


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
