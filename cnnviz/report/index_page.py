"""index.html: one page of every figure of a run, in sections, with captions."""

from __future__ import annotations

import html
import json
from pathlib import Path

from cnnviz.io.atomic import atomic_write_text
from cnnviz.report.batching import FigureFile


# ------------------------------------------------------------------------------ index page
def write_index(folder: Path, title: str, sections: list[tuple[str, list[FigureFile]]]) -> Path:
    """An index.html showing every figure with its caption, grouped in sections.

    Its title and sections are also kept in index.json, so a later command can add a section
    (`add_index_section`).
    """
    atomic_write_text(folder / "index.json", json.dumps({"title": title, "sections": [
        {"heading": heading, "figures": [{"path": str(Path(item.path).resolve()
                                                      .relative_to(folder.resolve())),
                                          "caption": item.caption} for item in figures]}
        for heading, figures in sections]}, indent=1) + "\n")
    parts = [
        "<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
         "figure{display:inline-block;margin:.5em;vertical-align:top;background:#fff;"
         "padding:.5em;border:1px solid #ddd}img{max-width:520px;display:block}"
         "figcaption{font-size:.85em;color:#333;max-width:520px}</style>"),
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, figures in sections:
        parts.extend(_section_html(folder, heading, figures))
    return atomic_write_text(folder / "index.html", "\n".join(parts) + "\n")


def _section_html(folder: Path, heading: str, figures: list[FigureFile]) -> list[str]:
    parts = [f"<h2>{html.escape(heading)}</h2>"]
    for figure_file in figures:
        text = figure_file.caption
        relative = Path(figure_file.path).resolve().relative_to(folder.resolve())
        parts.append(
            f"<figure><img src='{html.escape(relative.as_posix())}' alt='{html.escape(text)}'>"
            f"<figcaption>{html.escape(text)}</figcaption></figure>"
        )
    return parts


def add_index_section(folder: Path, heading: str, figures: list[FigureFile], *,
                      title: str | None = None) -> Path:
    """Add (or replace, by heading) one section of `folder`'s index.html; create the page if
    there is none. `title` is used for a new page only."""
    folder = Path(folder)
    saved = folder / "index.json"
    page_file = folder / "index.html"
    if page_file.is_file() and not saved.is_file():  # a page written before index.json existed
        return atomic_write_text(page_file, page_file.read_text() + "\n".join(
            _section_html(folder, heading, figures)) + "\n")
    sections: list[tuple[str, list[FigureFile]]] = []
    if saved.is_file():
        page = json.loads(saved.read_text())
        title = page["title"]
        sections = [(section["heading"], [FigureFile(folder / item["path"], item["caption"])
                                          for item in section["figures"]])
                    for section in page["sections"] if section["heading"] != heading]
    sections.append((heading, list(figures)))
    return write_index(folder, title or folder.name, sections)
