"""dpolab.cli.notebook_output: which cells draw, the missing-figure check, the offline HTML page; and that no library
import picks a matplotlib backend (a Jupyter kernel must keep its inline one, or its figures never show)."""

import os
import subprocess
import sys

import nbformat
import pytest

from dpolab.cli.notebook_output import count_images, figures_drawn, missing_figures, notebook_html

PNG = "iVBORw0KGgo="  # stands for image data; nothing here decodes it


def code(source, outputs=()):
    return nbformat.v4.new_code_cell(source, outputs=list(outputs))


def image():
    return nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})


def table():
    return nbformat.v4.new_output("execute_result", data={"text/html": "<table/>"}, execution_count=1)


@pytest.mark.parametrize("source, expected", [
    ("fig, ax = plt.subplots()\nax.plot([1, 2])", 1),
    ("fig = plt.figure()\nfig2, (a, b) = plt.subplots(1, 2)", 2),  # one per new figure
    ("fig = frontier_figure(rows)\nsave_figure(fig, path)", 1),  # dpolab.evaluate.plotting constructors; the saver is not one
    ("history.plot(x='step', y='loss')", 1),  # pandas opens a figure of its own
    ("plt.hist(values)", 1),
    ("optimizer.step()\nprint(table.round(3))\nsave_figure(fig, path)", 0),
    ("%matplotlib inline\nfig, ax = plt.subplots()", 1),  # not Python: read from the text
    ("x = 1  # plt.subplots() in a comment", 0),
])
def test_figures_drawn(source, expected):
    assert figures_drawn(source) == expected


def test_missing_figures_counts_images_per_cell():
    cells = [
        nbformat.v4.new_markdown_cell("plt.subplots() in prose does not count"),
        code("fig, ax = plt.subplots()\ntable", [table(), image()]),  # figure shown after the cell's result
        code("fig = plt.figure()\nfig2 = plt.figure()", [image()]),  # one of two figures missing
        code("fig, ax = plt.subplots()", [table()]),  # no image at all
        code("print(1)", []),
    ]
    assert count_images(cells[1].outputs) == 1
    problems = missing_figures(cells)
    assert [p.split(" draws")[0] for p in problems] == ["cell 2", "cell 3"]
    assert "draws 2 figure(s) but shows 1" in problems[0]


def test_html_is_self_contained_with_offline_mathjax():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("The optimum: $$\\pi^*(y|x) \\propto \\pi_{ref}(y|x)\\, e^{r(x, y)/\\beta}$$"),
        code("fig, ax = plt.subplots()", [image()]),
    ])
    page = notebook_html(nb)
    assert "window.MathJax" in page and "MathJax.Hub" not in page  # MathJax 3 config, not nbconvert's MathJax 2
    assert len(page) > 1_000_000  # the MathJax bundle itself is inlined (about 2.3 MB) ...
    assert "<script src=" not in page  # ... and nothing is loaded from elsewhere (no CDN, no require.js)
    assert "cdnjs.cloudflare.com" not in page and "unpkg.com" not in page
    assert f'src="data:image/png;base64,{PNG}"' in page
    assert "$$\\pi^*(y|x)" in page  # the TeX stays for MathJax to typeset in the browser


def test_no_library_import_selects_a_matplotlib_backend():
    """A Jupyter kernel sets MPLBACKEND to its inline backend; importing dpolab must leave it (the command line
    switches to Agg in its ``main`` only)."""
    script = (
        "import importlib, pkgutil, matplotlib, dpolab\n"
        "for m in pkgutil.walk_packages(dpolab.__path__, 'dpolab.'):\n"
        "    importlib.import_module(m.name)\n"
        "import matplotlib.pyplot\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "svg"


def test_command_line_draws_headless():
    import matplotlib

    from dpolab import cli

    before = matplotlib.get_backend()
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert matplotlib.get_backend().lower() == "agg"
    finally:
        matplotlib.use(before)


def test_kernels_run_on_ipc_and_do_not_print_the_tcp_advice(tmp_path, capfd):
    """dpolab notebooks / dpolab sweep start kernels over IPC (issue 28): the kernel computes as before, and its
    "running over TCP without encryption" line (written to the terminal, once per notebook) is not printed."""
    from dpolab.cli.notebook_output import execute_notebook, kernel_manager_class

    manager = kernel_manager_class()
    if manager is None:
        pytest.skip("no IPC transport here (Windows, or a runtime folder too deep for socket paths)")
    first, second = manager(), manager()
    assert first.transport == "ipc" and first.ip != second.ip  # kernels started at once never share sockets
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x: int = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("print(x * 2)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(tmp_path / "in.ipynb"))
    execute_notebook(tmp_path / "in.ipynb", tmp_path / "out.ipynb", parameters={"x": 21}, kernel_name="python3",
                     cwd=str(tmp_path), progress_bar=False)
    assert nbformat.read(str(tmp_path / "out.ipynb"), as_version=4).cells[-1].outputs[0]["text"] == "42\n"
    assert "without encryption" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ipynb", "out.ipynb"]  # no socket files left here


def test_small_datasets_are_saved_without_a_progress_bar(tmp_path, capfd):
    from datasets import Dataset, load_from_disk
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    from dpolab.sample.pairs import save_dataset

    was = is_progress_bar_enabled()
    enable_progress_bar()
    try:
        save_dataset(Dataset.from_list([{"a": 1}, {"a": 2}]), tmp_path / "d")
        assert "Saving the dataset" not in capfd.readouterr().err
        assert is_progress_bar_enabled()  # the user's setting is restored
    finally:
        (enable_progress_bar if was else disable_progress_bar)()
    assert load_from_disk(str(tmp_path / "d"))["a"] == [1, 2]
