"""The documentation site's generated pages (an MkDocs hook: ``hooks`` in mkdocs.yml; ``make docs`` builds the site).

Nothing here is typed twice: the front page is the README, the parameter reference is read from the Config (names,
defaults, ranges, help, reuse keys) and MLproject (which entry points take each one), and the benchmark and
reliability records are the generated BENCHMARKS.md and RELIABILITY.md with the figures they show.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from pipelines.config import LIMITS, PROJECT_ROOT, Config

# Repository files served as site pages: source -> page. Their links to each other and to docs/ are rewritten to pages.
PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks-record.md", "RELIABILITY.md": "reliability-record.md"}
RESULTS = "benchmarks/results/*.*"  # the figures BENCHMARKS.md shows and the results files it names, served at the same paths


def entry_points_taking(root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """Parameter name -> the MLproject entry points that take it (YAML anchors resolved)."""
    project = yaml.safe_load((root / "MLproject").read_text())
    taking: dict[str, list[str]] = {}
    for entry, spec in project["entry_points"].items():
        for name in spec.get("parameters", {}):
            taking.setdefault(name, []).append(entry)
    return taking


def parameter_reference(root: Path = PROJECT_ROOT) -> str:
    """The parameter reference page: one row per Config field, in the order the Config declares them."""
    taking = entry_points_taking(root)
    rows = []
    for f in fields(Config):
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name == "cache_dir":
            default = ".cache (in the project)"  # the machine's own path is not documentation
        keys = ", ".join(f.metadata["reuse"]) or "none"
        limits = str(LIMITS[f.name]) if f.name in LIMITS else ""
        cells = [f"`{f.name}`", f"`{default}`", limits, f.metadata["help"], keys, ", ".join(taking.get(f.name, [])) or "`kd` only"]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(
        [
            "# Parameters",
            "",
            "Generated from `pipelines/config/` (the one `Config` every entry point builds) and `MLproject` when the site is "
            "built: every `kd` command takes the fields it uses as `--name value`, every MLproject entry point as "
            "`-P name=value`. *Reuse keys*: the steps whose finished runs are found again by this parameter's value (a "
            "run is reused when its data digest, these parameters and its code fingerprint match); *none*: it decides no "
            "trained result. Ranges are checked before anything heavy loads.",
            "",
            "| parameter | default | range | meaning | reuse keys | entry points |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def as_page(text: str) -> str:
    """A repository Markdown file's links made site links: ``docs/x`` -> ``x``, the served files -> their pages."""
    for source, page in PAGES.items():
        text = re.sub(rf"\]\({re.escape(source)}([)#])", rf"]({page}\1", text)
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    """MkDocs hook: add the generated pages and the figures they show to the site's files."""
    from mkdocs.structure.files import File

    for source, page in PAGES.items():
        files.append(File.generated(config, page, content=as_page((PROJECT_ROOT / source).read_text())))
    files.append(File.generated(config, "parameters.md", content=parameter_reference()))
    for result in sorted(PROJECT_ROOT.glob(RESULTS)):
        files.append(File.generated(config, result.relative_to(PROJECT_ROOT).as_posix(), content=result.read_bytes()))
    return files
