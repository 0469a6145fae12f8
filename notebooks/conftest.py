"""Under nbval (``pytest --nbval-lax notebooks``): a cell that draws a figure must show it.

nbval executes each cell and keeps what the kernel sent in ``item.test_outputs``. A figure that never reaches
the notebook (a library that switched the kernel to a non-interactive backend, a figure closed before the cell
ends) leaves a cell that draws without an ``image/png`` output; this hook fails that cell. The same check runs
on the executed copies of ``dpolab notebooks`` (:func:`dpolab.cli.notebook_output.missing_figures`).
"""

import pytest

from dpolab.cli.notebook_output import count_images, figures_drawn


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a cell that raised has failed already; nothing more to check
    cell, outputs = getattr(item, "cell", None), getattr(item, "test_outputs", None)
    if cell is not None and outputs is not None and cell.get("cell_type") == "code":
        expected, shown = figures_drawn(cell.source), count_images(outputs)
        if shown < expected:
            first = cell.source.strip().splitlines()[0]
            pytest.fail(f"{item.name} ({first!r}) draws {expected} figure(s) but the executed notebook shows {shown} "
                        "image/png output(s); did something select a non-inline matplotlib backend?", pytrace=False)
    return result
