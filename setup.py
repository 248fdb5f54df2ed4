"""Build script: two extension modules, so that a CUDA build failure never costs the CPU kernels.

    sophon_fast._C        the C++ sources of csrc/sources.txt, CPU only: always built; a failure
                          here fails the install.
    sophon_fast._C_cuda   the same bindings compiled with SOPHON_FAST_WITH_CUDA plus every .cu
                          (CPU and CUDA dispatch, the same function names): built when torch has
                          CUDA and nvcc is found. OPTIONAL: if it fails to compile or link (a
                          toolkit without some header, an nvcc/torch CUDA major mismatch) the
                          install still succeeds with the CPU extension, says so in a banner, and
                          leaves the reason in sophon_fast/_C_cuda_build_error.txt, which
                          ``sophon-fast backends`` and sophon_fast._backend report.

Environment:
    SOPHON_FAST_NO_EXT=1     install pure Python (Triton + reference backends only).
    SOPHON_FAST_NO_CUDA=1    build the CPU extension only, even with a CUDA torch and nvcc.
    SOPHON_FAST_BREAK_CUDA=1 hand nvcc an unknown option, so that the CUDA part really fails to
                             compile (make gpu-stack-check: the CPU extension must survive it).
    CUDA_HOME / CUDA_PATH    the CUDA toolkit to use (else found from nvcc, see _find_cuda_home).
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": A100 and H100).
    MAX_JOBS                 parallel compile jobs (read by torch's ninja build).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
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


def _sees_cuda_macro(path: str, seen: set[Path] | None = None) -> bool:
    """True if ``path`` or a file it includes with quotes mentions SOPHON_FAST_WITH_CUDA."""
    seen = set() if seen is None else seen
    file = (ROOT / path).resolve()
    if file in seen or not file.is_file():
        return False
    seen.add(file)
    text = file.read_text(errors="ignore")
    if "SOPHON_FAST_WITH_CUDA" in text:
        return True
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
        for base in (file.parent, ROOT / "csrc"):
            if (base / name).is_file():
                if _sees_cuda_macro(str((base / name).resolve().relative_to(ROOT)), seen):
                    return True
                break
    return False


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


CUDA_MODULE = "sophon_fast._C_cuda"
# Written next to the built modules when the optional CUDA module fails (read by _backend).
CUDA_ERROR_FILE = "_C_cuda_build_error.txt"


def _banner(lines: list[str]) -> None:
    rule = "=" * 78
    print("\n".join(["", rule, *lines, rule, ""]), file=sys.stderr, flush=True)


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) with one build folder per module and an optional CUDA one.

    One folder each because both modules compile the same .cpp paths with different macros: in one
    folder their objects would overwrite each other. The CUDA module is built last; any failure of
    it (or of torch's pre-build CUDA checks, which run for every module at once) is caught, the CPU
    module is (re)built alone, and the install goes on.
    """

    class BuildExtOptionalCuda(base):
        def run(self) -> None:
            # setuptools builds --inplace and editable installs into build_lib and copies the
            # modules into the source tree afterwards; a stale module or error note there is
            # what Python would import.
            self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def _places(self) -> list[Path]:
            places = [Path(self.get_ext_fullpath(CUDA_MODULE)).parent]
            if getattr(self, "_to_source", False):
                places.append(ROOT / "sophon_fast")
            return places

        def _drop_stale_cuda(self) -> None:
            # A module left by an earlier build would be imported instead of the failed new one.
            suffix = Path(self.get_ext_fullpath(CUDA_MODULE)).name
            for place in self._places():
                for path in (place / suffix, place / CUDA_ERROR_FILE):
                    path.unlink(missing_ok=True)

        def _cuda_failed(self, error: BaseException) -> None:
            reason = f"{type(error).__name__}: {error}".strip()
            self._drop_stale_cuda()
            for place in self._places():
                place.mkdir(parents=True, exist_ok=True)
                (place / CUDA_ERROR_FILE).write_text(reason + "\n")
            path = self._places()[-1] / CUDA_ERROR_FILE
            _banner(
                [
                    "sophon_fast: the CUDA part (sophon_fast._C_cuda) FAILED to build; the CPU",
                    "extension sophon_fast._C is built and installed, CUDA tensors will run on the",
                    "Triton or reference backends. The compiler output is above; reason:",
                    f"  {reason.splitlines()[0][:300] if reason else '?'}",
                    f"(kept in {path})",
                ]
            )

        def build_extensions(self) -> None:
            self._drop_stale_cuda()
            cuda = [e for e in self.extensions if e.name == CUDA_MODULE]
            if not cuda:
                super().build_extensions()
                return
            self.extensions = [e for e in self.extensions if e.name != CUDA_MODULE] + cuda
            # torch appends its flags to each module's arguments; a retry must see the same
            # command lines, or ninja recompiles the CPU module from scratch.
            saved = {e.name: copy.deepcopy(e.extra_compile_args) for e in self.extensions}
            self._building = None
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any CUDA failure leaves the CPU module
                if (
                    self._building not in (None, CUDA_MODULE)
                    or Path(self.get_ext_fullpath(CUDA_MODULE)).is_file()
                ):
                    raise  # a CPU module failed, or something after the CUDA one: fail
                self._cuda_failed(error)
                self.extensions = [e for e in self.extensions if e.name != CUDA_MODULE]
                for e in self.extensions:
                    e.extra_compile_args = saved[e.name]
                super().build_extensions()  # "up-to-date" when the CPU module built before
                return
            print(f"sophon_fast: built sophon_fast._C (CPU) and {CUDA_MODULE} (CUDA)")

        def build_extension(self, ext) -> None:
            self._building = ext.name
            base_temp = self.build_temp
            shared = getattr(ext, "shared_sources", None)
            if shared:
                # The CPU module's objects of the sources that never see SOPHON_FAST_WITH_CUDA
                # are the same bits: link them instead of compiling them twice.
                objects = self.compiler.object_filenames(
                    shared, output_dir=os.path.join(base_temp, "_C")
                )
                missing = [o for o in objects if not os.path.isfile(o)]
                if missing:
                    raise RuntimeError(
                        f"{ext.name} links objects of _C that were not built: {missing}"
                    )
                ext.extra_objects = objects
                ext.depends = list(dict.fromkeys([*ext.depends, *objects]))
            self.build_temp = os.path.join(base_temp, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base_temp

    return BuildExtOptionalCuda


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
    # setuptools rebuilds a module only when a source or one of these is newer than it.
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h*"))
    extensions = [
        CppExtension(
            "sophon_fast._C",
            sources=cpp_sources,
            depends=headers,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(
            f"sophon_fast: building the CPU extension and, optionally, {CUDA_MODULE} "
            f"(CUDA_HOME={cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        nvcc_flags = ["-O3"]
        if _flag("SOPHON_FAST_BREAK_CUDA"):
            # A changed command line: ninja reruns nvcc even where the objects are up to date.
            nvcc_flags.append("--sophon-fast-break-cuda")
        shared = [p for p in cpp_sources if not _sees_cuda_macro(p)]
        cuda_ext = CUDAExtension(
            CUDA_MODULE,
            sources=[p for p in cpp_sources if p not in shared] + cu_sources,
            depends=headers,
            include_dirs=include_dirs,
            define_macros=[("SOPHON_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
        cuda_ext.shared_sources = shared
        extensions.append(cuda_ext)
    else:
        why = (
            "SOPHON_FAST_NO_CUDA=1"
            if _flag("SOPHON_FAST_NO_CUDA")
            else ("nvcc not found" if cuda_home is None else "torch has no CUDA")
        )
        print(f"sophon_fast: building the CPU extension only ({why})")
    build_ext = _build_ext_class(BuildExtension)
    return extensions, {
        "build_ext": build_ext.with_options(use_ninja=shutil.which("ninja") is not None)
    }


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
