"""The course as a site: executed notebooks as one static book, readable offline in any browser.

``OUT/index.html`` lists the chapters (one per notebook, in the order given) with their sections and exercises;
every chapter is ``OUT/<stem>.html``, nbconvert's page of the executed notebook (as ``dpolab notebooks --html``
writes it: figures embedded as data URIs) with a bar of links at its top and bottom (contents, previous, next) and
the same links as ``<link rel>`` in its head. MathJax 3 (TeX to SVG, from the ``django-static-mathjax`` wheel) is
copied once to ``OUT/mathjax/`` and every page loads it from there, so the folder needs no network and no server:
open ``index.html`` from disk, or copy the folder to any static host.

``hide_solutions=True`` publishes the book for students: every solution region shows nbgrader's stub, hidden tests
are left out, and the outputs of solution and test cells are dropped (the build stops if a solution line would still
show).
"""

from __future__ import annotations

import html
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.course.edition import CourseError, exercises, find_leaks, nbgrader_fields, source_text, student_cell

MATHJAX_FILE = "mathjax/tex-svg-full.js"
DEFAULT_TITLE = "Direct Preference Optimization, in notebooks"

# nbconvert's markdown headings: <h2 id="...">text<a class="anchor-link" href="#...">¶</a></h2>
_HEADING = re.compile(r'<h([1-3])\s+id="([^"]*)"[^>]*>(.*?)</h\1>', re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)
_TAG = re.compile(r"<[^>]+>")

_STYLE = """
nav.dpolab-book { display: flex; justify-content: space-between; gap: 1em; flex-wrap: wrap;
  max-width: 1100px; margin: 0.5em auto; padding: 0.5em 1em; border: 1px solid #ddd; border-radius: 4px;
  background: #f7f7f7; font-family: system-ui, sans-serif; font-size: 14px; }
nav.dpolab-book a { text-decoration: none; }
nav.dpolab-book .next { text-align: right; }
"""

# the book's page: the kit's offline page (dpolab.cli.notebook_output) with the navigation bars, and MathJax loaded from
# the book's own copy; the offline page's inline <script> then holds the config only (resources.dpolab_mathjax is
# empty), and the script element after it reads that config when it loads
_BOOK_TEMPLATE = """{%- extends 'dpolab_offline.html.j2' -%}
{%- block extra_css -%}
{% for rel, href in resources.dpolab_links %}<link rel="{{ rel }}" href="{{ href }}">
{% endfor %}<style type="text/css">{{ resources.dpolab_style }}</style>
{%- endblock extra_css -%}
{%- block html_head_css -%}
<script src="{{ resources.dpolab_mathjax_src }}"></script>
{%- endblock html_head_css -%}
{%- block body_header -%}
{{ super() }}
{{ resources.dpolab_nav }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.dpolab_nav }}
{{ super() }}
{% endblock body_footer %}
"""


@dataclass
class Chapter:
    """One notebook of the book: its page, its title and the headings listed on the contents page."""

    stem: str
    title: str
    page: str
    points: float = 0.0
    headings: list[tuple[int, str, str]] = field(default_factory=list)  # (level 2 or 3, anchor, inner HTML)


def chapter_title(nb: dict, stem: str) -> str:
    """The first level-1 markdown heading of the notebook (``# 01 · ...``), else its stem."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in source_text(cell).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return stem


def page_headings(page: str) -> list[tuple[int, str, str]]:
    """The sections (h2) and exercises (h3 headings that start with "Exercise") of an nbconvert page:
    ``(level, href fragment, inner HTML without the ¶ link)``."""
    found = []
    for level, anchor, inner in _HEADING.findall(page):
        inner = _ANCHOR_LINK.sub("", inner).strip()
        text = html.unescape(_TAG.sub("", inner)).strip()
        if level == "2" or (level == "3" and text.startswith("Exercise")):
            found.append((int(level), anchor, inner))
    return found


def published_notebook(nb: dict, stem: str, hide_solutions: bool) -> dict:
    """The executed notebook as the book shows it: as it is, or (``hide_solutions``) each solution region as
    nbgrader's stub, hidden tests removed, solution and test cells without outputs."""
    if not hide_solutions:
        return nb
    cells, hidden = [], []
    for index, cell in enumerate(nb["cells"]):
        if nbgrader_fields(cell):
            student, removed = student_cell(cell, f"{stem}, cell {index}")
            hidden += removed
            cell = {**cell, "source": "".join(student["source"])}
            if cell["cell_type"] == "code":  # what the answer or the hidden tests printed
                cell = {**cell, "outputs": [], "execution_count": None}
        cells.append(cell)
    published = {**nb, "cells": cells}
    leaks = find_leaks(published, hidden)
    if leaks:
        raise CourseError(f"{stem}: the book's page would show solution lines: " + "; ".join(leaks[:5]))
    return published


def _nav(chapters: list[Chapter], index: int) -> tuple[str, list[tuple[str, str]]]:
    """The bar of links of chapter ``index`` and its ``<link rel>`` pairs."""
    previous = chapters[index - 1] if index > 0 else None
    following = chapters[index + 1] if index + 1 < len(chapters) else None
    links = [("contents", "index.html")]
    cells = ['<a class="contents" rel="contents" href="index.html">Contents</a>']
    if previous:
        links.append(("prev", previous.page))
        cells.insert(0, f'<a class="prev" rel="prev" href="{previous.page}">← {html.escape(previous.title)}</a>')
    else:
        cells.insert(0, "<span></span>")
    if following:
        links.append(("next", following.page))
        cells.append(f'<a class="next" rel="next" href="{following.page}">{html.escape(following.title)} →</a>')
    else:
        cells.append("<span></span>")
    return '<nav class="dpolab-book">' + "".join(cells) + "</nav>", links


def chapter_page(nb: dict, chapters: list[Chapter], index: int) -> str:
    """Chapter ``index`` as an HTML page (images embedded, MathJax from the book's copy, navigation bars)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    from dpolab.cli.notebook_output import _TEMPLATE

    nav, links = _nav(chapters, index)
    loader = jinja2.DictLoader({"dpolab_offline.html.j2": _TEMPLATE, "dpolab_book.html.j2": _BOOK_TEMPLATE})
    exporter = HTMLExporter(extra_loaders=[loader], template_file="dpolab_book.html.j2", embed_images=True)
    resources = {"dpolab_mathjax": "", "dpolab_mathjax_src": MATHJAX_FILE, "dpolab_nav": nav, "dpolab_links": links,
                 "dpolab_style": _STYLE, "metadata": {"name": chapters[index].title}}
    body, _ = exporter.from_notebook_node(nbformat.from_dict(nb), resources=resources)
    return body


def index_page(title: str, chapters: list[Chapter]) -> str:
    """The contents page: every chapter with its sections and exercises (and their points), linked."""
    items = []
    for chapter in chapters:
        points = f' <span class="points">(exercises: {chapter.points:g} points)</span>' if chapter.points else ""
        entries = "".join(f'<li class="h{level}"><a href="{chapter.page}#{anchor}">{inner}</a></li>'
                          for level, anchor, inner in chapter.headings)
        items.append(f'<li><a class="chapter" href="{chapter.page}">{html.escape(chapter.title)}</a>{points}'
                     + (f"<ul>{entries}</ul>" if entries else "") + "</li>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<style type="text/css">
body {{ max-width: 900px; margin: 2em auto; padding: 0 1em; font-family: system-ui, sans-serif; line-height: 1.5; }}
ol.chapters > li {{ margin-bottom: 1em; }} a.chapter {{ font-weight: bold; }} li.h3 {{ margin-left: 1.5em; }}
ol.chapters ul {{ list-style: none; padding-left: 1em; }} .points {{ color: #666; }}
</style>
<script>window.MathJax = {{tex: {{inlineMath: [['$', '$'], ['\\\\(', '\\\\)']]}}, svg: {{fontCache: 'global'}}}};</script>
<script src="{MATHJAX_FILE}"></script>
</head>
<body>
<h1>{html.escape(title)}</h1>
<nav class="contents"><ol class="chapters">
{chr(10).join(items)}
</ol></nav>
</body>
</html>
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_book(out: Path, notebooks: list[Path], title: str = DEFAULT_TITLE, hide_solutions: bool = False) -> list[Path]:
    """Write the book of the executed ``notebooks`` (in this order) to ``out``; return the pages, index first.

    Every notebook must have been executed (``dpolab notebooks`` writes them to runs/notebooks/); a notebook
    whose code cells never ran, or (``hide_solutions``) one whose page would show a solution line, is refused,
    naming it, before anything is written.
    """
    import nbformat

    from dpolab.cli.notebook_output import mathjax_script

    if not notebooks:
        raise CourseError("the book needs at least one notebook")
    loaded = []
    for path in map(Path, notebooks):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook (run `dpolab notebooks` first; it writes the executed "
                                    "notebooks to runs/notebooks/)")
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
        if code and all(c.get("execution_count") is None for c in code):
            raise CourseError(f"{path}: not executed (no code cell has run); the book shows executed notebooks: "
                              "run `dpolab notebooks` first")
        loaded.append((path.stem, published_notebook(nb, path.stem, hide_solutions)))
    chapters = [Chapter(stem, chapter_title(nb, stem), f"{stem}.html",
                        sum(e.points for e in exercises(nb, stem))) for stem, nb in loaded]
    mathjax = mathjax_script()  # before anything is written: the hint when MathJax is missing
    out = Path(out)
    (out / MATHJAX_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mathjax, out / MATHJAX_FILE)
    written = []
    for index, (_, nb) in enumerate(loaded):
        page = chapter_page(nb, chapters, index)
        chapters[index].headings = page_headings(page)
        _write(out / chapters[index].page, page)
        written.append(out / chapters[index].page)
    _write(out / "index.html", index_page(title, chapters))
    return [out / "index.html", *written]
