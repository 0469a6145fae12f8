"""What an executed notebook shows: its figures, quiet library output and kernel, and a self-contained HTML copy.

The notebook tests (``notebooks/conftest.py`` under nbval) and ``dpolab notebooks`` check that every code cell
that draws a figure produced as many ``image/png`` outputs as figures it makes (:func:`missing_figures`).
:func:`write_html` renders an executed notebook to one HTML file with its images embedded and MathJax 3
inlined from the ``django-static-mathjax`` wheel, so equations render in a browser without a network.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

# pyplot calls that open a new figure; any call to a function named ``*_figure`` (dpolab.evaluate.plotting's
# constructors, e.g. ``frontier_figure``) does too, except the saver
NEW_FIGURE_CALLS = {"subplots", "figure", "subplot_mosaic"}
# pyplot calls that draw (into a new figure when none is open); any ``.plot(...)`` (pandas) draws too
DRAWING_CALLS = {"plot", "hist", "bar", "barh", "scatter", "imshow", "errorbar", "step", "matshow"}
NOT_A_FIGURE = {"save_figure"}
MATHJAX_HINT = "pip install django-static-mathjax  (it ships MathJax 3; the notebooks extra includes it)"


def _called_names(source: str) -> list[tuple[str | None, str]]:
    """``(receiver, name)`` of every call in ``source``: ``plt.subplots(...)`` gives ``("plt", "subplots")``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics or shell lines: fall back to the text
        return [(receiver or None, name) for receiver, name in re.findall(r"(?:(\w+)\.)?(\w+)\s*\(", source)]
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                receiver = func.value.id if isinstance(func.value, ast.Name) else None
                calls.append((receiver, func.attr))
            elif isinstance(func, ast.Name):
                calls.append((None, func.id))
    return calls


def figures_drawn(source: str) -> int:
    """How many figures a code cell's source makes, at least: 0 when it draws nothing.

    A cell makes one figure per ``plt.subplots`` / ``plt.figure`` / ``plt.subplot_mosaic`` call and per call of
    a ``*_figure`` constructor (``save_figure`` excepted); a cell that only plots (``df.plot(...)``,
    ``plt.hist(...)``) makes at least one.
    """
    calls = _called_names(source)
    made = sum(1 for receiver, name in calls if (receiver == "plt" and name in NEW_FIGURE_CALLS)
               or (name.endswith("_figure") and name not in NOT_A_FIGURE))
    draws = any((receiver == "plt" and name in DRAWING_CALLS) or name == "plot" for receiver, name in calls)
    return made or int(draws)


def count_images(outputs: Iterable[Mapping]) -> int:
    """Number of ``image/png`` outputs among a cell's outputs (nbformat dicts or nbval's)."""
    return sum(1 for out in outputs if "image/png" in (out.get("data") or {}))


def missing_figures(cells: Iterable[Mapping]) -> list[str]:
    """One message per executed code cell that draws more figures than it shows as ``image/png`` outputs.

    Args:
        cells: notebook cells (``nb["cells"]`` of an executed notebook, as dicts or ``NotebookNode``).
    """
    problems = []
    for index, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        expected, shown = figures_drawn(source), count_images(cell.get("outputs") or [])
        if shown < expected:
            first = source.strip().splitlines()[0] if source.strip() else ""
            problems.append(f"cell {index} draws {expected} figure(s) but shows {shown} image/png output(s): {first}")
    return problems


def quiet_library_progress() -> None:
    """Switch off transformers' and datasets' own progress bars (weight loading, dataset saving).

    In a notebook they fill cells with bars that say nothing; the kit's own bars (``progress=True``) stay.
    """
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils.logging import disable_progress_bar as disable_transformers_bars

    disable_progress_bar()
    disable_transformers_bars()


# the longest Unix socket path the OS takes (sun_path: 108 bytes on Linux, 104 on macOS), and what a kernel's IPC
# sockets add to the runtime folder ("/dpolab-kernel-<16 hex digits>-<n>")
_SOCKET_PATH_MAX, _IPC_SUFFIX = 103, 36


@functools.cache
def kernel_manager_class():
    """The kernel manager for notebooks run from the command line: the kernel on IPC instead of TCP; None to keep
    jupyter_client's default (TCP) where IPC cannot work.

    Over TCP every kernel prints "Kernel is running over TCP without encryption ... susceptible to eavesdropping",
    once per executed notebook. The sockets are on 127.0.0.1, so only this machine can reach them, and every message
    is signed with the kernel's own key; the line is ipykernel's general advice, not a problem of the run. IPC
    sockets are files in Jupyter's runtime folder (``jupyter --runtime-dir``) that only this user can open, so the
    advice does not apply and ipykernel does not print it. Windows has no IPC transport, and a runtime folder whose
    socket paths would exceed the OS limit cannot hold them: there, TCP and its line stay.
    """
    import os
    import secrets

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    runtime = jupyter_runtime_dir()
    if os.name != "posix" or len(runtime) + _IPC_SUFFIX > _SOCKET_PATH_MAX:
        return None

    class IpcKernelManager(AsyncKernelManager):
        """``AsyncKernelManager`` with ``transport="ipc"``: Unix domain sockets in the runtime folder, under a name of
        its own per kernel (jupyter_client's default, "kernel-ipc-<n>" in the working folder, is shared by every kernel
        started there: two at once, as in ``dpolab sweep --jobs 2``, would read each other's messages)."""

        def __init__(self, **kwargs):
            os.makedirs(runtime, mode=0o700, exist_ok=True)
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(runtime, f"dpolab-kernel-{secrets.token_hex(8)}"))
            super().__init__(**kwargs)

    return IpcKernelManager


def execute_notebook(source: str | Path, output: str | Path, **kwargs):
    """``papermill.execute_notebook`` with the kernel on IPC where possible (:func:`kernel_manager_class`), so the
    kernel's TCP advice is not printed once per notebook; every keyword goes to papermill."""
    import papermill

    manager = kernel_manager_class()
    if manager is not None:
        kwargs.setdefault("kernel_manager_class", manager)
    return papermill.execute_notebook(str(source), str(output), **kwargs)


def mathjax_script() -> Path:
    """Path of MathJax 3's single-file TeX-to-SVG bundle inside the ``django-static-mathjax`` wheel.

    ``tex-svg-full.js`` holds every TeX extension and draws glyphs as SVG paths, so it loads no fonts or
    further files: inlined in a page, it renders the page's equations offline. The package is located, not
    imported (it is a Django app).
    """
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "static" / "mathjax" / "es5" / "tex-svg-full.js"
        if path.is_file():
            return path
    raise FileNotFoundError(f"MathJax 3 (es5/tex-svg-full.js) is not installed; run: {MATHJAX_HINT}")


# nbconvert's lab page without what it would fetch from CDNs: MathJax 3 inlined in place of the MathJax 2
# loader (delimiters as in Jupyter); no require.js, widget manager or mermaid loader (nothing here uses them)
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script>
window.MathJax = {
  tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
        processEscapes: true, processEnvironments: true, tags: 'ams'},
  svg: {fontCache: 'global'},
  options: {ignoreHtmlClass: 'tex2jax_ignore|jp-InputArea-editor'}
};
</script>
<script>{{ resources.dpolab_mathjax }}</script>
{%- endblock html_head_js_mathjax -%}
"""


def notebook_html(notebook) -> str:
    """An executed notebook (path or ``NotebookNode``) as one self-contained HTML page (images and MathJax inlined)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    if not isinstance(notebook, nbformat.NotebookNode):
        notebook = nbformat.read(str(notebook), as_version=4)
    # a literal "</script" inside the inlined code would end the script element early
    script = mathjax_script().read_text(encoding="utf-8").replace("</script", "<\\/script")
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"dpolab_offline.html.j2": _TEMPLATE})],
                            template_file="dpolab_offline.html.j2", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook, resources={"dpolab_mathjax": script})
    return body


def write_html(notebook_path: str | Path, html_path: str | Path | None = None) -> Path:
    """Write the executed notebook at ``notebook_path`` as self-contained HTML (default: same name, ``.html``)."""
    notebook_path = Path(notebook_path)
    html_path = Path(html_path) if html_path else notebook_path.with_suffix(".html")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(notebook_html(notebook_path), encoding="utf-8")
    tmp.replace(html_path)
    return html_path
