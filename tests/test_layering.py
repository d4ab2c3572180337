"""Imports run one way: core <- stages <- pipeline, and no two project modules import each other.

The check parses every module with `ast` (imports inside functions and `TYPE_CHECKING` blocks
count too), so a lazy import cannot hide a wrong-way dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "stages", "pipeline")
# package -> project packages it must never import
FORBIDDEN = {"core": ("stages", "pipeline"), "stages": ("pipeline",)}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement refers to (relative imports made absolute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _resolve(name: str, files: dict) -> str | None:
    """The project module `name` refers to: itself, or the longest module prefix of it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in files:
            return candidate
    return None


def import_graph(root: Path, packages=PACKAGES) -> dict[str, dict[str, str]]:
    """module -> {imported project module: file importing it}; an import of a project package's
    missing module still counts (as the dotted name) so that the direction check sees it."""
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        where = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=where)):
            for name in _targets(node, module, path.name == "__init__.py"):
                target = _resolve(name, files) or (name if name.split(".")[0] in packages else None)
                if target and target != module:
                    edges.setdefault(target, where)
    return graph


def layering_violations(root: Path, packages=PACKAGES) -> list[str]:
    graph = import_graph(root, packages)
    problems = []
    for module, edges in sorted(graph.items()):
        own = module.split(".")[0]
        for target, where in sorted(edges.items()):
            if target.split(".")[0] in FORBIDDEN.get(own, ()):
                problems.append(f"{where}: `{own}` module {module} imports {target} ({own} must not import it)")
    for module, edges in sorted(graph.items()):
        for target in sorted(edges):
            if module < target and module in graph.get(target, {}):
                problems.append(f"import cycle: {module} ({edges[target]}) <-> {target} ({graph[target][module]})")
    return problems


def test_the_project_imports_in_one_direction_without_cycles():
    problems = layering_violations(REPO)
    assert problems == [], "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_names_each_injected_violation(tmp_path):
    _write(tmp_path, {
        "core/__init__.py": "", "core/errors.py": "X = 1\n",
        "core/bad.py": "def f():\n    from stages.a import A\n",
        "stages/__init__.py": "", "stages/a.py": "from core.errors import X\nA = 1\n",
        "stages/b.py": "import pipeline.runner\nfrom . import c\n",
        "stages/c.py": "def g():\n    from .b import h\n",
        "pipeline/__init__.py": "", "pipeline/runner.py": "from stages import a\nfrom core import errors\n",
    })
    assert layering_violations(tmp_path) == [
        "core/bad.py: `core` module core.bad imports stages.a (core must not import it)",
        "stages/b.py: `stages` module stages.b imports pipeline.runner (stages must not import it)",
        "import cycle: stages.b (stages/b.py) <-> stages.c (stages/c.py)",
    ]
    _write(tmp_path, {"core/bad.py": "", "stages/b.py": "", "stages/c.py": ""})
    assert layering_violations(tmp_path) == []
