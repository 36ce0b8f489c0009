"""The code fingerprint: a hash of the sources that shape a trained model, so a finished step is reused only when
the code that would train it again is the code that trained it (see ``pipelines.tracking.runs.reuse_finished``).

A step's sources are the import closure of its module inside the project, found from the ``import`` statements
themselves (every one, also those inside functions), never from a hand-kept list: a new module a step imports, or a
preset moved to another file, joins the key by being imported."""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

# The folder holding the project's packages: file names below are relative to it, so a checkout anywhere on disk
# (a clone, a worktree, an MLflow project copy) has the same fingerprint for the same sources.
SOURCE_ROOT = Path(__file__).resolve().parent.parent

# The module that defines each step whose finished runs are reused: its import closure is the step's code.
STEP_MODULES = {
    "prepare": "pipelines.steps.prepare",
    "teacher": "pipelines.steps.teacher",
    "distill": "pipelines.steps.distill",
    "compare": "search.compare",
    "main": "kd.main",  # kd evidence reuses a finished main run (its wall times are what it reports)
}


def module_file(root: Path, module: str) -> Path | None:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py`` under ``root``), or None for a module
    outside the project (the standard library, TensorFlow)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module name an import statement in ``path`` (the source of ``module``) may load, relative ones resolved:
    ``from a import b`` may load the package ``a`` and its submodule ``a.b``, so both are named; each module's
    parent packages are imported before it, so they are named too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".") if node.level else []
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def import_closure(root: Path, module: str) -> list[str]:
    """The project modules ``module`` imports, directly or not, itself and its parent packages included, as sorted file
    names relative to ``root``."""
    seen: dict[str, Path] = {}
    pending = [".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)]
    while pending:
        name = pending.pop()
        path = module_file(root, name)
        if name in seen or path is None:
            continue
        seen[name] = path
        pending.extend(imported_modules(path, name))
    return sorted(path.relative_to(root).as_posix() for path in seen.values())


def step_sources(root: Path, step: str) -> list[str]:
    """The files that make ``step``'s code: its module's import closure; for a run that is never reused (a trial, a
    promotion), every module of the project's packages, so its tag still says which code ran."""
    if step in STEP_MODULES:
        return import_closure(root, STEP_MODULES[step])
    packages = {path.parent for path in root.glob("*/__init__.py")} - {root / "tests"}
    return sorted(path.relative_to(root).as_posix() for package in packages for path in package.rglob("*.py"))


def fingerprint_sources(root: Path, step: str) -> str:
    """SHA-256 over each file of ``step``'s sources (:func:`step_sources`): its relative name and bytes (line endings
    as ``\\n``, so a Windows checkout agrees)."""
    digest = hashlib.sha256()
    for name in step_sources(root, step):
        source = (root / name).read_bytes().replace(b"\r\n", b"\n")
        # Name and length first: moving code from one module to the next changes the fingerprint too.
        digest.update(f"{name}\0{len(source)}\0".encode() + source)
    return digest.hexdigest()


@functools.cache
def code_fingerprint(step: str = "") -> str:
    """The fingerprint of ``step``'s code in this process (empty: the whole project's), read once (at its first run),
    so an edit while it trains does not relabel its runs."""
    return fingerprint_sources(SOURCE_ROOT, step)
