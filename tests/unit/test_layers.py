"""The package's layers and the size of its functions, read from its source with ``ast``
(nothing is imported).

Every module's imports of other distil_scale modules form a graph that must have no cycle, may
only point down the layers of docs/STYLE (a module imports its own layer or a lower one), and
sits at the top of its module: a function-local import of the package is allowed only where
ALLOWED_LOCAL says why. Importing ``a.b.c`` runs ``a/b/__init__.py`` first, so an import also
counts as an edge to every package above its target: that is how a cycle hides behind an
``__init__`` (``teacher`` -> ``train.step`` runs ``train/__init__`` -> ``loop`` -> ``setup``
-> ``teacher``).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = "distil_scale"
ROOT = Path(__file__).resolve().parents[2] / PKG

# a function longer than this is split into named pieces (one reading of a piece at a time)
MAX_FUNCTION_LINES = 120

# (importing module, imported module) -> why it cannot sit at the top of the module
ALLOWED_LOCAL: dict[tuple[str, str], str] = {}

# the first match of a module's dotted name (longest prefix) gives its layer
LAYERS = {
    "errors": 0, "config": 0, "distributed": 0, "fsio": 0, "assets": 0,
    "runtime": 1, "hub": 1, "ds_config": 1,
    "families": 2, "models": 2, "losses": 2, "teacher": 2, "data": 2,
    "engine": 3, "checkpoint": 3, "metrics": 3, "evaluate": 3, "model_card": 3,
    "train": 4, "glue": 4, "launchers": 4, "pretrain_cli": 4,
    "data.prepare_cli": 5, "tools": 5, "scripts": 5,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node, current: str, is_pkg: bool, modules: set[str]) -> list[str]:
    """The package modules an import statement names (``from .x import y``: ``x.y`` when y is
    a module, else ``x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if node.level:
        base = current.split(".") if is_pkg else current.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    found = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
    return [t for t in found if t in modules]


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING")


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> the package modules it imports at its top, [(module, target, line)] of the
    imports inside functions)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    top: dict[str, set[str]] = {m: set() for m in modules}
    local: list[tuple[str, str, int]] = []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"

        def walk(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for t in _targets(child, mod, is_pkg, modules):
                        if in_function:
                            local.append((mod, t, child.lineno))
                        else:
                            top[mod].add(t)
                elif _is_type_checking(child):
                    continue  # annotations only: never executed
                else:
                    walk(child, in_function or isinstance(
                        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(ast.parse(path.read_text(), str(path)), False)
    return top, local


def with_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each edge to ``a.b.c`` also goes to ``a.b`` (its ``__init__`` runs first)."""
    out = {}
    for mod, targets in graph.items():
        edges = set()
        for t in targets:
            parts = t.split(".")
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        out[mod] = {e for e in edges if e in graph and e != mod and not mod.startswith(e + ".")}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(mod: str) -> int | None:
    name = mod[len(PKG) + 1:]
    for key in sorted(LAYERS, key=len, reverse=True):
        if name == key or name.startswith(key + "."):
            return LAYERS[key]
    return None


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
            for m in sorted(graph) for t in sorted(graph[m])
            if layer_of(m) is not None and layer_of(t) is not None
            and layer_of(t) > layer_of(m)]


def problems(root: Path = ROOT) -> list[str]:
    top, local = import_graph(root)
    edges = {m: set(t) for m, t in top.items()}
    for m, t, _ in local:
        edges[m].add(t)
    edges = with_parents(edges)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    out += [f"function-local import: {m}:{line} imports {t} (move it to the top, or say why "
            "in ALLOWED_LOCAL)" for m, t, line in local if (m, t) not in ALLOWED_LOCAL]
    out += [f"upward import: {u}" for u in upward(edges)]
    return out


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method of more than ``limit`` lines (``def`` line to its last)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: "
                               f"{n} lines")
    return out


def test_every_module_has_a_layer():
    top, _ = import_graph()
    assert [m for m in sorted(top) if m != PKG and layer_of(m) is None] == []


def test_imports_are_acyclic_at_the_top_and_point_down_the_layers():
    assert problems() == []


def test_the_walk_sees_a_cycle_behind_a_package_init_and_a_local_import(tmp_path):
    """The checks themselves, on a made-up package holding the kind of cycle this one had."""
    pkg = tmp_path / PKG
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("from .loop import go\n")
    (pkg / "train" / "loop.py").write_text("from ..teacher import t\n\ndef go():\n    pass\n")
    (pkg / "train" / "step.py").write_text("def s():\n    pass\n")
    (pkg / "teacher.py").write_text("def t():\n    from .train.step import s\n    return s\n")
    found = problems(pkg)
    assert f"import cycle: {PKG}.teacher <-> {PKG}.train <-> {PKG}.train.loop" in found
    assert any(p.startswith(f"function-local import: {PKG}.teacher:2 imports "
                            f"{PKG}.train.step") for p in found)
    assert f"upward import: {PKG}.teacher (layer 2) imports {PKG}.train (layer 4)" in found


def test_no_function_is_over_the_line_limit():
    assert long_functions() == []


def test_the_length_check_counts_from_def_to_the_last_line(tmp_path):
    """The check itself: a method of 4 lines is over a limit of 3, a function of 3 is not."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "m.py").write_text("def fits():\n    a = 1\n    return a\n\n\n"
                              "class C:\n    def long(self):\n        a = 1\n        b = 2\n"
                              "        return a + b\n")
    assert long_functions(pkg, limit=3) == [f"{PKG}/m.py:7 long: 4 lines"]
    assert long_functions(pkg, limit=4) == []
