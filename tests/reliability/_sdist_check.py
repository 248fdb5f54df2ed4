"""`make sdist-check`: the source distribution builds, installs into a fresh environment and runs.

    python tests/reliability/_sdist_check.py [WORK_DIR]       (default build/sdist-check)

1. Builds the sdist with setuptools' PEP 517 backend, in this process (what ``python -m build
   --sdist --no-isolation`` calls; no extra package needed) and checks it holds every file under
   csrc/, CMakeLists.txt and the requirement files (at fdbb492 it held no header, no .cu and no
   csrc/sources.txt, so ``pip install sophon_fast-0.1.0.tar.gz`` failed at metadata generation).
2. Creates a fresh virtual environment (no system site-packages) and links into its
   site-packages only the already installed distributions the build and the package need (torch
   and its requirements, numpy, safetensors, tqdm, matplotlib, setuptools, wheel, ninja, pip), each
   with its metadata, so pip sees them installed and nothing is downloaded or recompiled.
3. In that environment, builds the wheel from the sdist (``pip wheel --no-build-isolation``: the
   path ``pip install sdist.tar.gz`` takes) and installs it with ``--no-index`` (so the
   declared dependencies must be satisfied by what is there).
4. From a folder outside the checkout, imports the installed copy (asserting it is not the
   checkout), checks the compiled CPU extension loads, and runs a 2-outer-step protect().
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the build (setuptools, torch's cpp_extension, ninja) and `import sophon_fast` need.
NEEDED = ["torch", "numpy", "safetensors", "tqdm", "matplotlib", "setuptools", "wheel", "ninja"]
NEEDED += ["pip"]  # the venv is made --without-pip: its bundled setuptools would shadow ours


def required_members(root: Path) -> list[str]:
    """Paths (relative to the sdist's top folder) a usable sdist must contain."""
    members = [str(p.relative_to(root)) for p in sorted((root / "csrc").rglob("*")) if p.is_file()]
    members += ["CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "LICENSE"]
    members += [str(p.relative_to(root)) for p in sorted((root / "requirements").glob("*.txt"))]
    return [m for m in members if "__pycache__" not in m]


def _checkout_files(root: Path) -> list[str]:
    """The files a fresh clone would have: tracked plus untracked-but-not-ignored (new files)."""
    try:
        listed = subprocess.check_output(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but builds
        skip = (".git", ".venv", "build", "dist")
        return [
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file()
            and not p.relative_to(root).parts[0].startswith(skip)
            and ".egg-info" not in str(p)
            and p.suffix not in (".so", ".pyc")
        ]
    return [f for f in listed.decode().split("\0") if f and (root / f).is_file()]


def build_sdist(out: Path) -> Path:
    """Build the sdist from a copy of the checkout's files: setuptools reuses a stale
    ``*.egg-info/SOURCES.txt`` in the source folder, which hid the missing MANIFEST.in."""
    from setuptools import build_meta

    stage = out / "src"
    for name in _checkout_files(ROOT):
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    cwd = os.getcwd()
    os.chdir(stage)
    try:
        name = build_meta.build_sdist(str(out))
    finally:
        os.chdir(cwd)
    return out / name


def missing_members(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    have = {n.split("/", 1)[1] for n in names if "/" in n}
    return [m for m in required_members(ROOT) if m not in have] if top else ["<empty archive>"]


def _closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need, their requirements included (extras skipped)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        key = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = md.distribution(key)
        except md.PackageNotFoundError:
            continue  # an optional or platform-specific requirement not installed here
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(req)
    return list(seen.values())


def link_distributions(site: Path, names: list[str]) -> int:
    """Symlink each distribution's top-level entries and metadata folder into ``site``."""
    count = 0
    for dist in _closure(names):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source, target = base / top, site / top
            if source.exists() and not target.exists() and top not in ("bin", "__pycache__"):
                target.symlink_to(source)
                count += 1
    return count


SMOKE = r"""
import sys, torch, sophon_fast
from sophon_fast import ProtectConfig, available_backends, protect
from sophon_fast.models import build_model
assert "/site-packages/" in sophon_fast.__file__, sophon_fast.__file__
assert "cpu" in available_backends(), available_backends()
torch.manual_seed(0)
model = build_model("mlp", {"in_features": 16, "hidden": [8], "num_classes": 3})
x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
config = ProtectConfig(inner_steps=2, outer_steps=2, batch_size=8, adapt_size=6, guard_threshold=None)
result = protect(model, (x, y), (x, y), config, progress=False)
assert len(result.history) == 2, result.history
print("sdist install ok:", sophon_fast.__file__, "backends", list(available_backends()))
"""


def main(work: Path) -> int:
    start = time.perf_counter()
    work = work.resolve()
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    sdist = build_sdist(work / "dist")
    missing = missing_members(sdist)
    if missing:
        print(f"sdist-check: {sdist.name} lacks {missing}", file=sys.stderr)
        return 1
    print(f"sdist-check: {sdist.name} holds every csrc/ file ({time.perf_counter() - start:.0f} s)")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    linked = link_distributions(site, NEEDED)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOPHON_FAST_NO_EXT")}
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(work / "wheel"), str(sdist)],
        check=True,
        env=env,
        cwd=work,
    )
    print(f"sdist-check: wheel built from the sdist ({time.perf_counter() - start:.0f} s)")
    (wheel,) = (work / "wheel").glob("*.whl")
    subprocess.run([*pip, "install", "--no-index", str(wheel)], check=True, env=env, cwd=work)
    subprocess.run([str(py), "-c", SMOKE], check=True, env=env, cwd=work)
    print(
        f"sdist-check: fresh venv ({linked} linked entries), sdist -> wheel -> install -> "
        f"protect() in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "sdist-check"))
