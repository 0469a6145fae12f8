"""The HTML copy of an executed notebook, opened in headless Chromium with no network: every figure is an <img>
with a non-zero size, every equation is typeset (no raw ``$$`` left in the text), and nothing is fetched.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and the
``selenium`` package (dev extra); skipped without them. Executes 01_derivation (under a minute) with papermill.
"""

from pathlib import Path

import pytest

from dpolab.cli.notebook_output import count_images, missing_figures, write_html

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_derivation.ipynb"

# run in the page once MathJax has typeset it
INSPECT = """
const done = arguments[arguments.length - 1];
MathJax.startup.promise.then(() => {
  const markdown = [...document.querySelectorAll('.jp-MarkdownCell')].map(cell => cell.innerText).join('\\n');
  done({
    images: [...document.images].map(img => ({src: img.src.slice(0, 21), complete: img.complete,
      natural: [img.naturalWidth, img.naturalHeight], shown: [img.clientWidth, img.clientHeight]})),
    equations: document.querySelectorAll('mjx-container[display="true"]').length,
    errors: document.querySelectorAll('mjx-merror').length,
    markdown: markdown,
    fetched: performance.getEntriesByType('resource').map(entry => entry.name),
  });
}, err => done({failed: String(err)}));
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    papermill = pytest.importorskip("papermill")
    import nbformat

    out = tmp_path_factory.mktemp("notebooks") / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", cwd=str(NOTEBOOK.parent),
                               progress_bar=False)
    return out, nbformat.read(str(out), as_version=4)


def test_rendered_notebook_shows_figures_and_typeset_equations(browser, executed):
    path, nb = executed
    assert not missing_figures(nb.cells)
    figures = sum(count_images(cell.get("outputs") or []) for cell in nb.cells if cell.cell_type == "code")
    source_equations = sum("".join(cell.source).count("$$") // 2 for cell in nb.cells if cell.cell_type == "markdown")
    assert figures >= 3 and source_equations >= 5  # 01 draws three figures and displays its equations

    html = write_html(path)
    browser.get(html.as_uri())
    page = browser.execute_async_script(INSPECT)
    assert "failed" not in page, page

    assert len(page["images"]) == figures, page["images"]
    for img in page["images"]:
        assert img["src"] == "data:image/png;base64", img  # embedded, not a file beside the page
        assert img["complete"] and min(img["natural"]) > 0 and min(img["shown"]) > 0, img
    assert page["equations"] == source_equations and page["errors"] == 0
    assert "$$" not in page["markdown"] and "\\beta" not in page["markdown"]  # typeset, not raw TeX
    assert [url for url in page["fetched"] if not url.startswith(("data:", "file:"))] == []  # offline
