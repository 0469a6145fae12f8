"""The course as a site (dpolab.course.book): executed notebooks as one static book with a contents page and
contents/previous/next links, readable offline.

The fast tests build the book of three tiny hand-made "executed" notebooks (a display equation, one figure as an
``image/png`` output, one exercise with a hidden test; no kernel runs) and read the HTML. The slow tests open the
pages in headless Chromium with no network, as ``tests/test_notebook_html.py`` does for one notebook: the links
lead from the contents page through every chapter and back, every anchor of the contents page exists, every figure
is an embedded ``<img>`` of non-zero size, every equation is typeset by the book's own copy of MathJax, and
nothing is fetched. One slow test does this on the tiny notebooks (seconds), one on notebooks 01 and 06 executed
with papermill (about a minute).
"""

import base64
import html
import io
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dpolab.course.book import MATHJAX_FILE, build_book, page_headings
from dpolab.course.edition import CourseError
from dpolab.data.cache import REPO_ROOT

STEMS = ["01_first", "02_second", "03_third"]
SOLUTION_LINE = "return x * x  # the answer"
HIDDEN_LINE = "assert square(-4) == 16, 'negative numbers'"


def png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def executed_notebook(number: int) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: title, an equation, a section with a figure, an exercise."""
    nbgrader = {"schema_version": 3, "task": False, "locked": False, "solution": False, "grade": False}
    cells = [
        new_markdown_cell(f"# 0{number} · Chapter {number}, where $\\beta$ matters\n\n"
                          "$$\\mathcal{L} = -\\log \\sigma(\\beta \\Delta)$$"),
        new_markdown_cell("## 1 · Drawing & plotting"),
        new_code_cell("fig, ax = plt.subplots()", execution_count=1, outputs=[
            new_output("display_data", data={"image/png": png(), "text/plain": "<Figure size 200x150>"})]),
        new_markdown_cell("### Exercise 1 · squares (2 points)"),
        new_code_cell(f"def square(x):\n    ### BEGIN SOLUTION\n    {SOLUTION_LINE}\n    ### END SOLUTION",
                      execution_count=2, metadata={"nbgrader": {**nbgrader, "solution": True, "grade_id": "square"}}),
        new_code_cell(f"assert square(3) == 9\n### BEGIN HIDDEN TESTS\n{HIDDEN_LINE}\n### END HIDDEN TESTS",
                      execution_count=3, metadata={"nbgrader": {**nbgrader, "grade": True, "locked": True,
                                                                "grade_id": "square_test", "points": 2}}),
        new_markdown_cell("## 2 · What comes next"),
        new_code_cell("print(square(2))", execution_count=4, outputs=[new_output("stream", text="4\n")]),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("executed")
    paths = []
    for number, stem in enumerate(STEMS, start=1):
        nbformat.write(executed_notebook(number), str(folder / f"{stem}.ipynb"))
        paths.append(folder / f"{stem}.ipynb")
    return paths


@pytest.fixture(scope="module")
def book(executed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    pages = build_book(out, executed, title="A tiny course")
    assert [p.name for p in pages] == ["index.html"] + [f"{stem}.html" for stem in STEMS]
    return out


def text_of(page: str) -> str:
    """What a page shows as text (pygments splits code into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def links(page: str, rel: str) -> list[str]:
    """The targets of ``<a rel=...>`` links (nbconvert's page writer reorders attributes)."""
    return [re.search(r'href="([^"]*)"', a).group(1) for a in re.findall(rf'<a [^>]*rel="{rel}"[^>]*>', page)]


def test_contents_page_lists_chapters_sections_and_exercises_in_order(book):
    index = (book / "index.html").read_text()
    assert "<h1>A tiny course</h1>" in index
    chapters = re.findall(r'<a class="chapter" href="([^"#]+)">', index)
    assert chapters == [f"{stem}.html" for stem in STEMS]
    assert "(exercises: 2 points)" in index
    for stem in STEMS:
        page = (book / f"{stem}.html").read_text()
        anchors = re.findall(rf'href="{stem}\.html#([^"]+)"', index)
        assert [a for _, a, _ in page_headings(page)] == anchors and len(anchors) == 3  # two sections, an exercise
        for anchor in anchors:
            assert f'id="{anchor}"' in page  # the contents page links to headings that exist


def test_every_chapter_links_to_contents_previous_and_next(book):
    for position, stem in enumerate(STEMS):
        page = (book / f"{stem}.html").read_text()
        previous = [f"{STEMS[position - 1]}.html"] if position > 0 else []
        following = [f"{STEMS[position + 1]}.html"] if position + 1 < len(STEMS) else []
        assert links(page, "contents") == ["index.html"] * 2  # a bar above and one below the notebook
        assert links(page, "prev") == previous * 2 and links(page, "next") == following * 2
        assert '<link href="index.html" rel="contents"/>' in page


def test_pages_are_offline_with_one_shared_mathjax_and_embedded_figures(book):
    mathjax = book / MATHJAX_FILE
    assert mathjax.stat().st_size > 1_000_000  # MathJax 3's single-file TeX-to-SVG bundle
    for page in [book / "index.html", *(book / f"{stem}.html" for stem in STEMS)]:
        text = page.read_text()
        assert f'<script src="{MATHJAX_FILE}"></script>' in text
        assert not re.search(r'(src|href)="(https?:)?//', text), page.name  # no CDN, no remote anything
    chapter = (book / "01_first.html").read_text()
    assert chapter.count('src="data:image/png;base64,') == 1
    assert len(chapter) < 1_000_000  # MathJax is not inlined in every page
    assert SOLUTION_LINE in text_of(chapter) and HIDDEN_LINE in text_of(chapter)  # the instructor's book


def test_students_book_shows_stubs_not_solutions(executed, tmp_path):
    build_book(tmp_path, executed, hide_solutions=True)
    for stem in STEMS:
        page = (tmp_path / f"{stem}.html").read_text()
        text = text_of(page)
        assert "raise NotImplementedError()" in text and "assert square(3) == 9" in text
        assert "x * x" not in text and "square(-4)" not in text and "BEGIN SOLUTION" not in text
        assert 'src="data:image/png;base64,' in page and re.search(r"print\(square\(2\)\)\s+4\s", text)  # outputs stay


def test_a_solution_line_elsewhere_stops_the_students_book(executed, tmp_path):
    nb = nbformat.read(str(executed[1]), as_version=4)
    nb.cells.append(new_markdown_cell(f"As we saw: `{SOLUTION_LINE}`"))
    nbformat.write(nb, str(tmp_path / "02_second.ipynb"))
    with pytest.raises(CourseError, match="02_second: the book's page would show solution lines"):
        build_book(tmp_path / "book", [executed[0], tmp_path / "02_second.ipynb"], hide_solutions=True)
    assert not (tmp_path / "book").exists()  # nothing written


def test_notebooks_that_never_ran_or_do_not_exist_are_refused(executed, tmp_path):
    nb = nbformat.read(str(executed[0]), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count, cell.outputs = None, []
    nbformat.write(nb, str(tmp_path / "01_first.ipynb"))
    with pytest.raises(CourseError, match="01_first.ipynb: not executed"):
        build_book(tmp_path / "book", [tmp_path / "01_first.ipynb"])
    with pytest.raises(FileNotFoundError, match="run `dpolab notebooks` first"):
        build_book(tmp_path / "book", [executed[0], tmp_path / "nope.ipynb"])
    assert not (tmp_path / "book").exists()


def test_cli_writes_the_book(executed, tmp_path, capsys):
    from dpolab.cli import main

    folder = str(executed[0].parent)
    assert main(["course", "book", str(tmp_path / "site"), "--executed", folder, "--notebooks", "02_second",
                 "01_first", "--hide-solutions"]) == 0
    assert "wrote 2 chapters" in capsys.readouterr().out
    index = (tmp_path / "site" / "index.html").read_text()
    assert re.findall(r'<a class="chapter" href="([^"#]+)">', index) == ["02_second.html", "01_first.html"]
    assert "x * x" not in text_of((tmp_path / "site" / "01_first.html").read_text())
    assert main(["course", "book", str(tmp_path / "other"), "--executed", folder, "--notebooks", "nope"]) == 2


# ---- in headless Chromium (slow) ----

# run in a page once MathJax has typeset it
INSPECT = """
const done = arguments[arguments.length - 1];
MathJax.startup.promise.then(() => {
  const text = [...document.querySelectorAll('.jp-MarkdownCell, nav')].map(e => e.innerText).join('\\n');
  done({
    images: [...document.images].map(img => ({src: img.src.slice(0, 21), complete: img.complete,
      natural: [img.naturalWidth, img.naturalHeight], shown: [img.clientWidth, img.clientHeight]})),
    equations: document.querySelectorAll('mjx-container[display="true"]').length,
    inline: document.querySelectorAll('mjx-container:not([display="true"])').length,
    errors: document.querySelectorAll('mjx-merror').length,
    text: text,
    target: document.querySelector(':target') ? document.querySelector(':target').id : null,
    fetched: performance.getEntriesByType('resource').map(entry => entry.name),
  });
}, err => done({failed: String(err)}));
"""


def inspect(browser) -> dict:
    page = browser.execute_async_script(INSPECT)
    assert "failed" not in page, page
    assert page["errors"] == 0 and "$$" not in page["text"] and "\\beta" not in page["text"], page["text"]
    remote = [url for url in page["fetched"] if not url.startswith(("data:", "file:"))]
    assert remote == [], remote  # offline
    assert all(url.endswith(MATHJAX_FILE) for url in page["fetched"] if url.startswith("file:")), page["fetched"]
    for img in page["images"]:
        assert img["src"] == "data:image/png;base64", img  # embedded, not a file beside the page
        assert img["complete"] and min(img["natural"]) > 0 and min(img["shown"]) > 0, img
    return page


def click(browser, selector: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, selector).click()


def read_the_book(browser, book: Path, executed: list[Path]) -> None:
    """Contents → first chapter → next … last → previous … first → contents, checking every page on the way;
    then every link of the contents page lands on its heading."""
    from selenium.webdriver.common.by import By

    from dpolab.cli.notebook_output import count_images

    stems = [path.stem for path in executed]
    notebooks = [nbformat.read(str(path), as_version=4) for path in executed]
    browser.get((book / "index.html").as_uri())
    inspect(browser)
    click(browser, "a.chapter")
    order = []
    for step in range(len(stems)):
        order.append(Path(browser.current_url).stem)
        page = inspect(browser)
        nb = notebooks[step]
        figures = sum(count_images(cell.get("outputs") or []) for cell in nb.cells if cell.cell_type == "code")
        equations = sum("".join(cell.source).count("$$") // 2 for cell in nb.cells if cell.cell_type == "markdown")
        assert len(page["images"]) == figures and page["equations"] == equations, (order[-1], page)
        if step + 1 < len(stems):
            click(browser, "nav.dpolab-book a[rel=next]")
    assert order == stems
    assert browser.find_elements(By.CSS_SELECTOR, "a[rel=next]") == []  # the last chapter has no next
    for stem in reversed(stems[:-1]):
        click(browser, "nav.dpolab-book a[rel=prev]")
        assert Path(browser.current_url).stem == stem
    assert browser.find_elements(By.CSS_SELECTOR, "a[rel=prev]") == []
    click(browser, "nav.dpolab-book a[rel=contents]")
    assert Path(browser.current_url).name == "index.html"
    targets = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "ol.chapters ul a")]
    assert targets
    for href in targets:
        browser.get(href)
        assert inspect(browser)["target"] is not None, href  # the heading the contents page promised


@pytest.mark.slow
def test_tiny_book_reads_offline_in_chromium(browser, book, executed):
    read_the_book(browser, book, executed)


@pytest.mark.slow
def test_book_of_executed_notebooks_reads_offline_in_chromium(browser, tmp_path):
    papermill = pytest.importorskip("papermill")
    executed = []
    for stem in ("01_derivation", "06_loss_family"):  # under a minute each on two cores
        source = REPO_ROOT / "notebooks" / f"{stem}.ipynb"
        papermill.execute_notebook(str(source), str(tmp_path / source.name), kernel_name="python3",
                                   cwd=str(source.parent), progress_bar=False)
        executed.append(tmp_path / source.name)
    build_book(tmp_path / "book", executed)
    read_the_book(browser, tmp_path / "book", executed)
    shutil.rmtree(tmp_path / "book")
