"""The layers stay layers: every import statement of the project's packages (at module level or inside a function)
points to its own layer or one below (pipelines < search < registry < benchmarks < kd), and no modules import
each other in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipelines", "search", "registry", "benchmarks", "kd")  # bottom first
# Inside pipelines: the modules at its top (names, fingerprint, batches, recipes, document) and the config package are
# the base every sub-package may import; the other sub-packages are floors of their own, bottom first.
PIPELINE_BASE_PACKAGES = ("config",)
PIPELINE_FLOORS = ("data", "evaluation", "models", "training", "tracking", "steps")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The project's modules ``name`` imports anywhere in its code: ``from a.b import c`` counts as ``a.b.c`` when that
    is a module, else as ``a.b``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` names the module a.b.c; the nearest enclosing project module is what is imported
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found - {name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def layer(name: str) -> int:
    return LAYERS.index(name.split(".")[0])


def test_the_import_graph_sees_imports_at_module_level_and_inside_functions() -> None:
    assert {"pipelines.config", "search.tune", "registry.promote"} <= GRAPH["kd.main"]
    assert "kd.main" in GRAPH["kd.cli"], "kd.cli imports the main chain inside a function, only after the arguments are checked"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets if layer(target) > layer(name))
    assert not upward, f"imports of a higher layer (order {' < '.join(LAYERS)}): {upward}"


def pipeline_floor(name: str) -> int:
    """A pipelines module's floor: -1 for the base, else its sub-package's index."""
    parts = name.split(".")
    return PIPELINE_FLOORS.index(parts[1]) if len(parts) > 2 and parts[1] not in PIPELINE_BASE_PACKAGES else -1


def test_every_pipelines_module_sits_in_a_floor_or_the_base() -> None:
    packages = {name.split(".")[1] for name in MODULES if name.startswith("pipelines.") and MODULES[name].name == "__init__.py"}
    assert packages == {*PIPELINE_FLOORS, *PIPELINE_BASE_PACKAGES}, "a new sub-package of pipelines needs its place in PIPELINE_FLOORS"


def test_inside_pipelines_no_module_imports_a_higher_floor_and_the_base_imports_no_floor() -> None:
    inside = {name: {t for t in targets if t.startswith("pipelines.")} for name, targets in GRAPH.items() if name.startswith("pipelines.")}
    upward = sorted(
        f"{name} -> {target}" for name, targets in inside.items() for target in targets if pipeline_floor(target) > pipeline_floor(name)
    )
    assert not upward, f"imports of a higher floor of pipelines (base < {' < '.join(PIPELINE_FLOORS)}): {upward}"


def test_no_modules_import_each_other_in_a_cycle() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in sorted(GRAPH[name]):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def environment_reads(name: str, variable: str) -> int:
    """How often module ``name`` reads ``variable`` from its own environment (``os.environ.get/pop/[...]``,
    ``os.getenv``); a copy made for a child process (``env.pop``) is not a read."""
    tree = ast.parse(MODULES[name].read_text())

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"

    def names_variable(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value == variable

    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value) and names_variable(node.slice):
            count += 1
        elif isinstance(node, ast.Call) and node.args and names_variable(node.args[0]):
            func = node.func
            getenv = isinstance(func, ast.Attribute) and func.attr == "getenv" and getattr(func.value, "id", "") == "os"
            if getenv or (isinstance(func, ast.Attribute) and is_environ(func.value)):
                count += 1
    return count


def test_the_run_mlflow_run_started_is_read_from_the_environment_once_by_kd_and_passed_down() -> None:
    readers = {name: count for name in MODULES if (count := environment_reads(name, "MLFLOW_RUN_ID"))}
    assert readers == {"kd.cli": 1}, f"MLFLOW_RUN_ID is resolved in kd.cli and passed down as launched_run_id; also read in {readers}"


def test_every_layer_is_installed_so_the_kd_command_imports_it_from_any_folder(tmp_path) -> None:
    # `kd evidence` imports benchmarks: run from outside the project (the console script's sys.path has no project
    # folder), it failed with "No module named 'benchmarks'" while the layer was left out of the installed packages.
    code = f"import importlib; [importlib.import_module(name) for name in {LAYERS!r}]"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
