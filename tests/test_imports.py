"""The modules of rlhf_ppo depend on each other one way: no import cycle, counting the imports
inside functions too (a function-local import that dodges a cycle is still a cycle), and the
lowest layers import no higher module."""

import ast
from pathlib import Path

import rlhf_ppo

PACKAGE = Path(rlhf_ppo.__file__).parent


def module_name(path: Path, root: Path) -> str:
    """Dotted name of the module at ``path`` in the package at ``root``: ``rlhf_ppo.tasks.tiny``;
    a package's ``__init__.py`` is the package itself."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The modules of the package that the file at ``path`` imports anywhere in it (top level,
    inside functions, under ``if TYPE_CHECKING``): ``from .x import y`` and ``import pkg.x`` give
    ``x``; ``from . import x`` gives the module ``x`` when there is one, else the package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from .x import y`: `x.y` when y is a submodule, else `x` (found below)
            found.update(f"{base}.{a.name}" for a in node.names)
    deps = set()
    for target in found:
        while target and target not in modules:  # `pkg.x.name` -> `pkg.x` -> `pkg`
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return deps


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` for every module of the package at ``root``."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, root, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if (cycle := visit(node)) is not None:
            return cycle
    return None


def test_rlhf_ppo_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "rlhf_ppo.models" in graph and "rlhf_ppo.packing" in graph["rlhf_ppo.models"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_lowest_layers_import_no_higher_module():
    """ops is pure math on tensors; lm (forward passes of a loaded model) builds on ops alone."""
    graph = import_graph(PACKAGE)
    assert graph["rlhf_ppo.ops"] == set()
    assert graph["rlhf_ppo.lm"] == {"rlhf_ppo.ops"}


def test_the_cycle_check_finds_a_function_local_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import torch\n\n\ndef f():\n    from .high import g\n    return g\n")
    (pkg / "high.py").write_text("from . import low\nfrom .sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from ..low import f\n")
    graph = import_graph(pkg)
    assert graph["pkg.high"] == {"pkg.low", "pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.high", "pkg.low", "pkg.high"]
    (pkg / "low.py").write_text("import torch\n")
    assert find_cycle(import_graph(pkg)) is None
