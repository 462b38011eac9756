"""The report as a document: sections of text, alerts, tables and pictures, written as HTML and Markdown.

Both renderings come from the same blocks, so ``index.html`` and ``report.md`` always say the same. The
HTML is self-contained (inline style, no scripts, no remote resources); pictures are PNG files beside it,
referenced by file name. Table cells are shown as given (callers format the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

import pandas as pd

from pipeline.cache import atomic_write_bytes

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 0.3em 0; }
.alert { background: #fdd; border: 2px solid #c00; padding: 0.8em 1em; font-weight: bold; }
figure { display: inline-block; vertical-align: top; margin: 0 1em 1.5em 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
"""


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Alert:
    """A paragraph shown prominently (a red box in HTML, a bold quote in Markdown)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table: the frame's columns as the header, its cells as text; an optional caption above it."""

    frame: pd.DataFrame
    caption: str = ""


@dataclass(frozen=True)
class Strong:
    """A table cell shown in bold (``<strong>`` in HTML, ``**`` in Markdown): a column's best value."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Picture:
    """A PNG beside the report, by its file name, with a caption."""

    file: str
    caption: str


Block = Text | Alert | Table | Picture


@dataclass(frozen=True)
class Section:
    """A titled run of blocks; ``level`` 2 for a chapter, 3 for a part of one."""

    title: str
    blocks: tuple[Block, ...]
    level: int = 2


def _html_cell(cell: object) -> str:
    return f"<strong>{escape(cell.text)}</strong>" if isinstance(cell, Strong) else escape(str(cell))


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Alert):
        return f'<p class="alert">{escape(block.text)}</p>'
    if isinstance(block, Picture):
        file, caption = escape(block.file), escape(block.caption)
        return f'<figure><img src="{file}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
    caption = f"<caption>{escape(block.caption)}</caption>" if block.caption else ""
    header = "".join(f"<th>{escape(str(name))}</th>" for name in block.frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(cell)}</td>" for cell in row) + "</tr>"
        for row in block.frame.itertuples(index=False)
    )
    return f"<table>{caption}<thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(title: str, sections: list[Section]) -> str:
    """The whole report as one HTML page."""
    body = [f"<h1>{escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h{section.level}>{escape(section.title)}</h{section.level}>")
        body += [_html_block(block) for block in section.blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _markdown_cell(value: object) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if isinstance(value, Strong) else text


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame as a GitHub Markdown table (header, rule, one line per row)."""
    lines = [
        "| " + " | ".join(_markdown_cell(name) for name in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _markdown_block(block: Block) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Alert):
        return f"> **{block.text}**"
    if isinstance(block, Picture):
        return f"![{block.caption}]({block.file})\n\n*{block.caption}*"
    return (f"**{block.caption}**\n\n" if block.caption else "") + markdown_table(block.frame)


def render_markdown(title: str, sections: list[Section]) -> str:
    """The whole report as one Markdown document."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"{'#' * section.level} {section.title}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def write_documents(folder: str | Path, title: str, sections: list[Section]) -> tuple[Path, Path]:
    """Write ``index.html`` and ``report.md`` of ``sections`` into ``folder``; returns their paths."""
    folder = Path(folder)
    index, markdown = folder / "index.html", folder / "report.md"
    atomic_write_bytes(index, render_html(title, sections).encode())
    atomic_write_bytes(markdown, render_markdown(title, sections).encode())
    return index, markdown
