"""The import graph of the one package: no cycles, data flows one way between the stages,
the core imports no stage and nothing imports the CLI.

An AST walk over every module, imports inside functions included (a function-level import that
closes a cycle is still a cycle: it only moves the failure to run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "cifar5m"
STAGES = ("shards", "generator", "dataset_server", "train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` (file ``path``) imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    """``core``, ``cli``, a stage name, or ``top`` (``cifar5m`` itself and ``cifar5m.__main__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*STAGES, "core", "cli") else "top"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a list of modules (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(edges):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(edges[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def wrong_edges(edges: dict[str, set[str]]) -> list[str]:
    """Edges that break the layering: the core imports no stage and no CLI; ``shards`` imports no
    other stage; generator, dataset_server and train import only shards among the stages; the CLI
    is imported by nothing but ``cifar5m.__main__``; the top package imports nothing at import
    time but the core (its public names are resolved lazily, see cifar5m/__init__.py)."""
    wrong = []
    for name, deps in edges.items():
        mine = layer(name)
        for dep in deps:
            other = layer(dep)
            if other == "cli" and mine != "cli" and name != "cifar5m.__main__":
                wrong.append(f"{name} -> {dep} (nothing imports the CLI)")
            elif mine == "core" and other not in ("core", "top"):
                wrong.append(f"{name} -> {dep} (the core imports no stage)")
            elif mine in STAGES and other in STAGES and other not in (mine, "shards"):
                wrong.append(f"{name} -> {dep} (stages import only shards)")
    return sorted(wrong)


def test_the_walk_sees_function_level_and_relative_imports():
    edges = graph()
    assert {"cifar5m.shards.manifest", "cifar5m.train.trainer", "cifar5m.generator.pipeline",
            "cifar5m.dataset_server.server", "cifar5m.core.errors", "cifar5m.cli.main"} <= set(edges)
    # The CLI's commands import each stage only inside their functions: the walk must see them.
    assert any(layer(m) == "train" for m in edges["cifar5m.cli.train"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_rules_catch_each_kind_of_wrong_edge():
    made_up = {
        "cifar5m.core.errors": {"cifar5m.shards.format"},
        "cifar5m.shards.reader": {"cifar5m.train.stream", "cifar5m.core.errors"},
        "cifar5m.train.stream": {"cifar5m.dataset_server.app", "cifar5m.shards.reader"},
        "cifar5m.generator.pipeline": {"cifar5m.cli.main"},
        "cifar5m.__main__": {"cifar5m.cli.main"},
    }
    assert wrong_edges(made_up) == [
        "cifar5m.core.errors -> cifar5m.shards.format (the core imports no stage)",
        "cifar5m.generator.pipeline -> cifar5m.cli.main (nothing imports the CLI)",
        "cifar5m.shards.reader -> cifar5m.train.stream (stages import only shards)",
        "cifar5m.train.stream -> cifar5m.dataset_server.app (stages import only shards)",
    ]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_core_stages_and_cli_are_layered():
    assert wrong_edges(graph()) == []


def test_only_one_top_level_package_is_shipped():
    """Every Python file of the distribution lives under cifar5m/ (setuptools' find would
    otherwise install a second top-level package, as `train` once did beside users' train.py)."""
    loose = [p.name for p in REPO_ROOT.iterdir()
             if p.is_dir() and (p / "__init__.py").is_file() and p.name not in ("cifar5m", "tests")]
    assert loose == []


def test_benchmarks_import_only_the_package():
    """benchmarks/ share helpers with the tests through the package, never by importing tests/."""
    wrong = []
    for path in sorted((REPO_ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("tests", "conftest")]
    assert wrong == []
