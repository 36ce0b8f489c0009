"""A tiny document model rendered to Markdown and to LaTeX, so both come from one list of blocks.

Text is plain; :class:`Code` and :class:`Math` spans mark what each format typesets differently. The report
(``registry.report``) and the comparison's tables (``registry.report.comparison``) are written with it, so they print
numbers and escape LaTeX alike.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import PROJECT_ROOT


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Math:
    latex: str


Span = str | Code | Math


@dataclass(frozen=True)
class Heading:
    level: int  # 1 section, 2 subsection, 3 subsubsection
    text: str


@dataclass(frozen=True)
class Paragraph:
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[tuple[Span, ...], ...]


@dataclass(frozen=True)
class Equation:
    latex: str


@dataclass(frozen=True)
class Table:
    label: str
    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    label: str
    path: str  # relative to the document's folder
    caption: str


Block = Heading | Paragraph | Bullets | Equation | Table | Figure


def num(value: float | None, digits: int = 4) -> str:
    """A metric as printed everywhere in the report (tests parse it back at this precision); ``n/a`` when undefined."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def data_label(data_dir: str | Path) -> str:
    """How a generated document names a data folder: its path relative to the project (``../shared/data/brain-mri-4class``)
    when it lies in the project's folder or beside it, else its folder name alone; never a path of the machine it ran on.
    A relative ``data_dir`` is taken from the working directory, as the steps read it."""
    if not str(data_dir):
        return "the embedded synthetic set"
    path = Path(os.path.abspath(data_dir))
    if path.is_relative_to(PROJECT_ROOT.parent):
        return Path(os.path.relpath(path, PROJECT_ROOT)).as_posix()
    return path.name


def para(*spans: Span) -> Paragraph:
    return Paragraph(tuple(spans))


def bullets(*items: Span | tuple[Span, ...]) -> Bullets:
    return Bullets(tuple(item if isinstance(item, tuple) else (item,) for item in items))


def table(label: str, caption: str, header: list[str], rows: list[list[str]]) -> Table:
    return Table(label, caption, tuple(header), tuple(tuple(row) for row in rows))


# Characters LaTeX treats specially, and the few non-ASCII symbols the report uses.
LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "×": r"$\times$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "−": "--",
    "–": "--",
    "α": r"$\alpha$",
    "Δ": r"$\Delta$",
    "→": r"$\rightarrow$",
    "·": r"$\cdot$",
    "²": r"$^2$",
    "<": r"$<$",
    ">": r"$>$",
    "|": r"$|$",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def _markdown_spans(spans: tuple[Span, ...]) -> str:
    return "".join(f"`{s.text}`" if isinstance(s, Code) else f"${s.latex}$" if isinstance(s, Math) else s for s in spans)


def latex_code(text: str) -> str:
    """Code as typed: ``-{}`` breaks the ``--`` ligature, which T1 fonts set as an en dash (``--env-manager`` would not paste back)."""
    return re.sub(r"-(?=-)", "-{}", latex_escape(text))


def _latex_spans(spans: tuple[Span, ...]) -> str:
    return "".join(
        rf"\texttt{{{latex_code(s.text)}}}" if isinstance(s, Code) else f"${s.latex}$" if isinstance(s, Math) else latex_escape(s)
        for s in spans
    )


def _numbered(blocks: list[Block], first_table: int, first_figure: int) -> dict[str, int]:
    """Table and figure numbers by label, continuing from the given numbers (sections are numbered together)."""
    numbers, tables, figures = {}, first_table, first_figure
    for block in blocks:
        if isinstance(block, Table):
            numbers[block.label], tables = tables, tables + 1
        elif isinstance(block, Figure):
            numbers[block.label], figures = figures, figures + 1
    return numbers


def to_markdown(blocks: list[Block], first_table: int = 1, first_figure: int = 1) -> str:
    numbers = _numbered(blocks, first_table, first_figure)
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * (block.level + 1)} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(_markdown_spans(block.spans))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {_markdown_spans(item)}" for item in block.items))
        elif isinstance(block, Equation):
            out.append(f"$$\n{block.latex}\n$$")
        elif isinstance(block, Table):
            cell = lambda text: text.replace("|", "\\|")  # noqa: E731 - a pipe would end the cell
            lines = [
                f"**Table {numbers[block.label]}.** {block.caption}",
                "",
                "| " + " | ".join(map(cell, block.header)) + " |",
                "|" + " --- |" * len(block.header),
            ]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Figure):
            out.append(f"![Figure {numbers[block.label]}]({block.path})\n\n*Figure {numbers[block.label]}. {block.caption}*")
    return "\n\n".join(out) + "\n"


def to_latex(blocks: list[Block]) -> str:
    commands = {1: "section", 2: "subsection", 3: "subsubsection"}
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(rf"\{commands[block.level]}{{{latex_escape(block.text)}}}")
        elif isinstance(block, Paragraph):
            out.append(_latex_spans(block.spans))
        elif isinstance(block, Bullets):
            out.append("\\begin{itemize}\n" + "\n".join(rf"  \item {_latex_spans(item)}" for item in block.items) + "\n\\end{itemize}")
        elif isinstance(block, Equation):
            out.append(f"\\begin{{equation}}\n{block.latex}\n\\end{{equation}}")
        elif isinstance(block, Table):
            rows = [" & ".join(latex_escape(c) for c in block.header) + r" \\", r"\midrule"] + [
                " & ".join(latex_escape(c) for c in row) + r" \\" for row in block.rows
            ]
            body = "\n".join(rows)
            out.append(
                f"\\begin{{table}}[htbp]\n\\centering\n\\caption{{{latex_escape(block.caption)}}}\\label{{tab:{block.label}}}\n\\small\n"
                f"\\begin{{tabular}}{{{'l' * len(block.header)}}}\n\\toprule\n{body}\n\\bottomrule\n\\end{{tabular}}\n\\end{{table}}"
            )
        elif isinstance(block, Figure):
            out.append(
                f"\\begin{{figure}}[htbp]\n\\centering\n\\includegraphics[width=0.9\\linewidth,height=0.8\\textheight,keepaspectratio]{{{block.path}}}\n"
                f"\\caption{{{latex_escape(block.caption)}}}\\label{{fig:{block.label}}}\n\\end{{figure}}"
            )
    return "\n\n".join(out) + "\n"


LATEX_PREAMBLE = r"""\documentclass[11pt]{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage{amsmath,amssymb}
\usepackage{graphicx}
\usepackage{booktabs}
\usepackage[margin=2.2cm]{geometry}
\sloppy
"""


def latex_document(title: str, inputs: list[str]) -> str:
    """A standalone article that \\input's the section files (so they can be pasted into a paper as they are)."""
    body = "\n".join(rf"\input{{{name}}}" for name in inputs)
    return f"{LATEX_PREAMBLE}\\title{{{latex_escape(title)}}}\n\\date{{}}\n\\begin{{document}}\n\\maketitle\n{body}\n\\end{{document}}\n"
