"""The package's shape, checked from its source (docs/DESIGN.md section 2, docs/STYLE.md rule 17).

Read with :mod:`ast`, nothing imported: every intra-package import points down the layer table
(or within its layer), the import graph has no cycle, intra-package imports sit at module top (a
function-local import hides a cycle until the function runs), only optional third-party packages are
imported lazily, no module inside the package imports from a package ``__init__``, ``attacks`` never
imports the engine, and no file or function outgrows what a reader can hold.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "sophon_fast"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top; a module may import its own layer or a lower one. A module is placed by its
# longest matching dotted prefix (relative to the package); the package's own __init__ is "".
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_json", "_progress", "_files", "_backend", "cpu_cache"),
    ("reference",),
    ("ops",),
    (
        "nn",
        "losses",
        "models",
        "data",
        "training",
        "noise_schedule",
        "diffusion",
        "config",
        "config_rules",
        "engine_options",
        "presets",
    ),
    ("engine", "attacks", "distributed"),
    ("api", "result", "tasks", "driver"),
    ("cli", "demo", "demo_generation", "__main__", ""),
)

# Imported inside functions on purpose: optional at install time, or heavy and needed by one path.
OPTIONAL_THIRD_PARTY = frozenset(
    {
        "triton",
        "tqdm",
        "optuna",
        "matplotlib",
        "safetensors",
        "torchvision",
        "PIL",
        "hypothesis",
        "torch.distributed",
    }
)

# Compiled extension modules of the package (layer 0, built from csrc/).
EXTENSIONS = frozenset({f"{PACKAGE}._C", f"{PACKAGE}._C_cuda"})

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 120


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a module of this package)
    line: int
    local: bool  # inside a function or class body
    from_package_init: bool  # names taken from a package __init__ that are not its submodules


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(tree: ast.AST, local: bool = False):
    """(node, inside a function or class body) for every import node."""
    for child in ast.iter_child_nodes(tree):
        inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _walk(child, inner)


def _scan() -> tuple[list[Import], list[tuple[str, int, str]]]:
    """Intra-package imports, and lazily imported third-party modules (module, line, name)."""
    imports: list[Import] = []
    lazy_third_party: list[tuple[str, int, str]] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, local in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name
                    if name == PACKAGE or name.startswith(PACKAGE + "."):
                        target = name if name in MODULES else name.rsplit(".", 1)[0]
                        imports.append(Import(module, target, node.lineno, local, False))
                    elif local:
                        lazy_third_party.append((module, node.lineno, name))
                continue
            target = _resolve(module, node)
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                if local:
                    lazy_third_party.append((module, node.lineno, target))
                continue
            plain_names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in EXTENSIONS:
                    continue
                if sub in MODULES:
                    imports.append(Import(module, sub, node.lineno, local, False))
                else:
                    plain_names.append(alias.name)
            if plain_names:
                from_init = target in PACKAGES and not (module == target or module in PACKAGES)
                imports.append(Import(module, target, node.lineno, local, from_init))
    return imports, lazy_third_party


IMPORTS, LAZY_THIRD_PARTY = _scan()


def layer_of(module: str) -> int | None:
    relative = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = relative == prefix or (prefix and relative.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, (
        f"modules outside the layer table (add them to LAYERS and docs/DESIGN.md): {missing}"
    )


def test_imports_point_down_the_layers():
    wrong = []
    for imp in IMPORTS:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is not None and dst is not None and dst > src:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target} (layer {dst} above {src})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_attacks_never_import_the_engine():
    wrong = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in IMPORTS
        if imp.source.startswith(f"{PACKAGE}.attacks")
        and imp.target.startswith(f"{PACKAGE}.engine")
    ]
    assert not wrong, "attacks import engine internals:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.source:
            edges[imp.source].add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, f"import cycles inside the package: {cycles}"


def test_intra_package_imports_sit_at_module_top():
    local = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in IMPORTS if imp.local]
    assert not local, "function-local intra-package imports (they hide cycles):\n" + "\n".join(
        local
    )


def test_only_optional_packages_are_imported_lazily():
    wrong = [
        f"{module}:{line} imports {name} inside a function"
        for module, line, name in LAZY_THIRD_PARTY
        if not any(name == opt or name.startswith(opt + ".") for opt in OPTIONAL_THIRD_PARTY)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_from_a_package_init():
    wrong = [
        f"{imp.source}:{imp.line} imports names from package {imp.target}; import the defining module"
        for imp in IMPORTS
        if imp.from_package_init
    ]
    assert not wrong, "\n".join(wrong)


def test_files_and_functions_stay_readable():
    too_long = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.count("\n") + (not text.endswith("\n"))
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT.parent)}: {lines} lines > {MAX_FILE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(
                        f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {length} lines > "
                        f"{MAX_FUNCTION_LINES}"
                    )
    assert not too_long, "\n".join(too_long)


# The checker itself, on small synthetic graphs: a rule that cannot fail checks nothing.


def test_cycle_finder_finds_cycles_and_only_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert sorted(_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})) == [
        ["a", "b"],
        ["c", "d"],
    ]


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        (PACKAGE, len(LAYERS) - 1),
        (f"{PACKAGE}._backend", 0),
        (f"{PACKAGE}.reference.sophon", 1),
        (f"{PACKAGE}.ops.flat_sgd_step", 2),
        (f"{PACKAGE}.engine.inner", 4),
        (f"{PACKAGE}.api", 5),
        (f"{PACKAGE}.cli", 6),
        (f"{PACKAGE}.unknown_module", None),
    ],
)
def test_layer_table_places_modules(module, layer):
    assert layer_of(module) == layer


def test_scanner_sees_local_relative_and_init_imports(tmp_path, monkeypatch):
    source = (
        "from . import sibling\n"
        "from .pkg import name\n"
        "def f():\n"
        "    from sophon_fast.ops import losses\n"
        "    import numpy\n"
    )
    tree = ast.parse(source)
    found = [(type(node).__name__, local) for node, local in _walk(tree)]
    assert found == [
        ("ImportFrom", False),
        ("ImportFrom", False),
        ("ImportFrom", True),
        ("Import", True),
    ]
    node = tree.body[1]
    assert _resolve(f"{PACKAGE}.engine.inner", node) == f"{PACKAGE}.engine.pkg"
    assert _resolve(f"{PACKAGE}.engine", node) == f"{PACKAGE}.engine.pkg"
