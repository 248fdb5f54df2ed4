"""tools/triton_check.py (``make triton-check``): every Triton kernel of the package is compiled.

The full check compiles ~400 specialisations for sm_80 and sm_90 (minutes); these tests keep its
promises cheap: every ``jit`` function in sophon_fast/ is registered, every one is launched by the
checker's cases or called from a launched kernel, the recorded specialisations are Triton's own
(a size of 1 is a constant), and the compile path works, on the size-1 loss specialisations
that once failed to compile (``n_cols.to`` on a Python int).
"""

import ast
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import triton_check  # noqa: E402

from sophon_fast.ops import _triton  # noqa: E402

pytestmark = pytest.mark.triton


def _decorated_jit_functions() -> set[str]:
    """module.qualname of every function in sophon_fast/ decorated with a ``jit``."""
    found = set()
    for path in sorted((ROOT / "sophon_fast").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                name = (
                    target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                )
                if name == "jit":
                    found.add(f"{module}.{node.name}")
    return found


@pytest.fixture(scope="module")
def recorded():
    """The checker's recording pass over all its cases (~20 s: the interpreter runs each op)."""
    return triton_check.record()


def test_every_jit_function_in_the_package_is_registered():
    decorated = _decorated_jit_functions()
    registered = {triton_check.kernel_name(k) for k in _triton.KERNELS}
    assert len(decorated) >= 19, sorted(decorated)  # the walk finds the kernels at all
    # A raw @triton.jit would bypass _triton.jit: no launch hook, no interpreter on CPU.
    assert decorated <= registered, f"not defined through _triton.jit: {decorated - registered}"


def test_every_jit_function_is_compiled_by_the_cases(recorded):
    twins, recorder = recorded
    launched, helpers, uncovered = triton_check.coverage(twins, recorder)
    assert not uncovered, f"no triton_check case launches or reaches {sorted(uncovered)}"
    assert launched | helpers == _decorated_jit_functions()
    # Helpers count only through a launched caller, and are never launched themselves.
    assert "sophon_fast.ops.losses._online_logsumexp" in helpers
    assert not launched & helpers
    for c in recorder.compilations.values():
        assert c.arch in triton_check.ARCHS


def test_an_unlaunched_kernel_is_reported(recorded, monkeypatch):
    _, recorder = recorded
    monkeypatch.setattr(_triton, "KERNELS", list(_triton.KERNELS))  # restored afterwards

    def _orphan_kernel(x_ptr):
        pass

    orphan = _triton.jit(_orphan_kernel)
    *_, uncovered = triton_check.coverage(triton_check.Twins(), recorder)
    assert uncovered == {triton_check.kernel_name(orphan)}


def test_recorder_applies_tritons_specialisation_rules(monkeypatch):
    import torch

    monkeypatch.setattr(_triton, "KERNELS", list(_triton.KERNELS))  # restored afterwards
    tl = _triton.tl

    def _probe_kernel(x_ptr, f, one, sixteen, seven, FLAG: tl.constexpr):
        pass

    probe = _triton.jit(_probe_kernel)
    recorder = triton_check.Recorder(triton_check.Twins(), archs=(80,))
    buffer = torch.zeros(8)
    for x in (buffer, buffer[1:]):  # 16-byte aligned, then 4 bytes off
        recorder(probe, (1,), (x, 0.5, 1, 32, 7), {"FLAG": True})
    aligned, offset = recorder.compilations.values()
    assert aligned.signature == {
        "x_ptr": "*fp32",
        "f": "fp32",  # a Python float is float32
        "one": "constexpr",  # an int equal to 1 is a compile-time constant
        "sixteen": "i32",
        "seven": "i32",
        "FLAG": "constexpr",
    }
    assert aligned.constexprs == {(2,): 1, (5,): True}
    divisible = {k for k, v in aligned.attrs.items() if v}
    assert divisible == {(0,), (3,)}  # the aligned pointer and 32, not 7
    assert {k for k, v in offset.attrs.items() if v} == {(3,)}
    assert aligned.options["num_warps"] == 4 and aligned.arguments.startswith("float32[8]")


def test_loss_launches_specialise_sizes_of_one(recorded):
    _, recorder = recorded
    square = [
        c
        for c in recorder.compilations.values()
        if c.kernel.endswith("losses._mean_square_forward_kernel") and c.arch == 80
    ]
    n_index = list(square[0].signature).index("n_elements")
    sign_index = list(square[0].signature).index("sign")
    assert {c.constexprs.get((n_index,)) for c in square} >= {1, None}  # 1 element, and more
    assert any(c.constexprs.get((sign_index,)) == 1 for c in square)  # dos: sign +1
    assert any(c.signature["sign"] == "i32" for c in square)  # mse_ascent: sign -1


def test_size_one_loss_specialisations_compile_for_sm80(recorded, tmp_path, monkeypatch):
    _, recorder = recorded
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    chosen = {}
    for c in recorder.compilations.values():
        if c.arch != 80 or not c.kernel.startswith("sophon_fast.ops.losses."):
            continue
        constant_one = [k for k, v in c.constexprs.items() if v == 1 and type(v) is int]
        names = [list(c.signature)[k[0]] for k in constant_one]
        if c.kernel.endswith("_mean_square_forward_kernel") and "n_elements" in names:
            chosen.setdefault("mse", c)
        kind = (
            c.constexprs.get((list(c.signature).index("KIND"),)) if "KIND" in c.signature else None
        )
        if "n_cols" in names and "n_rows" in names and kind == 3:  # klu divides by n_cols
            chosen.setdefault("klu", c)
    assert set(chosen) == {"mse", "klu"}, "the cases no longer launch the size-1 losses"
    results = triton_check.compile_all(list(chosen.values()), jobs=1)
    for r in results:
        assert r.error is None, f"{list(chosen.values())[r.index].describe()}:\n{r.error}"
        assert r.registers > 0 and not r.spills
