"""The package's import graph: a stage imports only earlier stages, and no two modules import each other.

Every `import` counts, at module level or inside a function, TYPE_CHECKING blocks included: a lazy import
is still a dependency. Importing a package counts as importing its `__init__`, so a submodule that imports
its own package and is re-exported by it is a circle too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_export"

# Data flows top to bottom; a module may import its own stage and the ones above it.
STAGES: list[tuple[str, ...]] = [
    (
        "moe_export.config",
        "moe_export.errors",
        "moe_export.files",
        "moe_export.lazy_api",
        "moe_export.ops",
        "moe_export.progress",
    ),  # foundation: no moe_export imports but these
    ("moe_export.ir",),
    ("moe_export.formats",),
    ("moe_export.reference",),
    ("moe_export.merging",),
    ("moe_export.export",),
    ("moe_export.runtimes",),
    ("moe_export.validation",),
    ("moe_export.serving",),
    ("moe_export.api",),
    ("moe_export.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules `path` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from pkg import name` imports pkg itself.
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [n if n in known else base for n in names]
        else:
            continue
        for full in names:
            while full and full not in known:
                full = full.rpartition(".")[0]
            if full and full != name:
                found.add(full)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def stage_of(name: str) -> int | None:
    for index, prefixes in enumerate(STAGES):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: components with more than one module are import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
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
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_every_module_belongs_to_a_stage() -> None:
    loose = [name for name in modules() if name != "moe_export" and stage_of(name) is None]
    assert not loose, f"modules outside every stage (add them to a stage folder or to STAGES): {loose}"


def test_no_module_imports_a_later_stage() -> None:
    back_edges = [
        f"{name} -> {dep}"
        for name, deps in graph().items()
        if (own := stage_of(name)) is not None
        for dep in sorted(deps)
        if (theirs := stage_of(dep)) is not None and theirs > own
    ]
    assert not back_edges, "imports of a later stage:\n" + "\n".join(back_edges)


def test_no_import_circles() -> None:
    circles = strongly_connected(graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checks_can_fail() -> None:
    """The detectors themselves: a circle and a back edge in a made-up graph are found."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
    assert stage_of("moe_export.cli.app") > stage_of("moe_export.export.onnx") > stage_of("moe_export.ir")
