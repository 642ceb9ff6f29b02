"""The import directions of docs/ARCHITECTURE.md, read from the source (every import statement, function-level
ones included): common's packages import only lower layers, no module takes part in an import circle, and task
packages use only public names of common."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# common's layers, lowest first: a package may import its own modules and those of lower layers, never a package
# of its own layer or of a higher one. common.task and common.metric are the interfaces every task implements.
LAYERS = (("utils", "metric"), ("cluster", "tracking", "models"), ("data",), ("task",), ("training",),
          ("inference",), ("runs",))
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
TASKS = ("biomass", "sclera", "roadwork")
SOURCE_PACKAGES = ("common",) + TASKS + ("sweeps", "hydra_plugins", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in SOURCE_PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def resolved_imports(modules: dict[str, Path], name: str) -> list[tuple[str, list[str], int]]:
    """Imports of one module, each naming the module it loads: `from common.data import augment` loads
    common.data.augment."""
    result = []
    for target, names, line in imports_of(modules[name]):
        submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
        if submodules:
            result += [(sub, [], line) for sub in submodules]
            names = [n for n in names if f"{target}.{n}" not in modules]
            if not names:
                continue
        result.append((target, names, line))
    return result


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "common" and len(parts) > 1 else None


Graph = dict[str, list[tuple[str, list[str], str]]]   # module -> (imported module, names, "file:line")


def import_graph() -> Graph:
    modules = source_modules()
    return {name: [(target, names, f"{modules[name].relative_to(REPO)}:{line}")
                   for target, names, line in resolved_imports(modules, name)] for name in modules}


def upward_imports(graph: Graph) -> list[str]:
    found = []
    for name in (m for m in graph if layer_of(m)):
        here = layer_of(name)
        for target, _, where in graph[name]:
            there = layer_of(target)
            if target == "common" or (there and there != here and RANK.get(there, -1) >= RANK.get(here, -1)):
                found.append(f"{where} ({here}) imports {target} ({there})")
    return found


def import_cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan) of the import graph."""
    edges = {name: sorted({t for t, _, _ in graph[name] if t in graph and t != name}) for name in graph}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return cycles


def test_common_imports_only_lower_layers():
    upward = upward_imports(import_graph())
    assert not upward, "imports against docs/ARCHITECTURE.md's layers:\n" + "\n".join(upward)


def test_every_common_module_belongs_to_a_layer():
    loose = [m for m in source_modules() if m.startswith("common.") and layer_of(m) not in RANK]
    assert not loose, f"modules of common outside the layers of docs/ARCHITECTURE.md: {loose}"


def test_no_import_circles():
    assert import_cycles(import_graph()) == []


def test_checks_see_an_upward_import_and_a_circle():
    """The two checks above on a made-up graph (so their empty answers mean something); a function-level import
    counts as much as one at the top."""
    graph = {"common.training.cv": [("common.training.parts", [], "cv.py:1")],
             "common.training.parts": [("common.task", [], "parts.py:1")],
             "common.task": [("common.training.cv", ["assign_folds"], "task.py:78")]}
    assert upward_imports(graph) == ["task.py:78 (task) imports common.training.cv (training)"]
    assert import_cycles(graph) == [sorted(graph)]
    functions = imports_of(REPO / "common" / "task.py")
    assert ("common.data.folds", ["assign_folds"]) in [(t, n) for t, n, _ in functions]


@pytest.mark.parametrize("task", TASKS)
def test_tasks_use_public_names_of_common_and_no_other_task(task):
    graph = import_graph()
    wrong = []
    for name in (m for m in graph if m.split(".")[0] == task):
        for target, names, where in graph[name]:
            root = target.split(".")[0]
            if root in TASKS and root != task:
                wrong.append(f"{where} imports another task's module {target}")
            if root == "common" and (any(part.startswith("_") for part in target.split("."))
                                     or any(n.startswith("_") for n in names)):
                wrong.append(f"{where} imports a private name of {target}: {names}")
            if root == "common" and layer_of(target) == "runs":
                wrong.append(f"{where} imports {target}: tasks are run by common.runs, never the other way")
    assert not wrong, "\n".join(wrong)
