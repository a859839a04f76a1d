"""The notebooks under notebooks/ execute cleanly in smoke mode.

Each notebook reads ``FEDJAX_LITE_SMOKE=1`` and shrinks itself to a seconds-
long run; it is executed top to bottom with nbclient in a fresh kernel whose
working directory is ``notebooks/`` (as when opened in Jupyter). Stored
notebooks must have their outputs stripped.

Almost all of a smoke run is JAX tracing and compiling the notebook's
distinct programs (each engine round program ~1-2 s at the tests' XLA
level 0), so the notebooks' smoke sizes keep those few and small: one size
bucket of client data where the data's sizes vary, one engine per method.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(
  (Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")
)
# The test checks that every figure cell displays an image, not how it
# looks: the kernel renders PNGs at 40 dpi without the inline backend's
# tight bounding box (which draws every figure twice), about half of a
# figure's rendering time at the defaults (~0.6 s -> ~0.3 s per figure).
KERNEL_ARGS = [
  "--InlineBackend.print_figure_kwargs={'dpi': 40, 'bbox_inches': None}"
]


def test_there_are_notebooks():
  names = [p.stem for p in NOTEBOOKS]
  assert any("quickstart" in n for n in names), names
  assert any("prototype" in n for n in names), names
  assert any("benchmark" in n for n in names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
        f"{path.name} has stored outputs; strip them (e.g. `jupyter "
        "nbconvert --clear-output --inplace` or jupytext --update)."
      )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_checks_its_results(path):
  """Every notebook asserts on what it computes (run by the test below), so
  a notebook whose numbers go wrong fails, not only one that crashes."""
  nb = nbformat.read(path, as_version=4)
  checks = [
    c
    for c in nb.cells
    if c.cell_type == "code"
    and any(
      line.lstrip().startswith(("assert ", "np.testing.assert", "chex.assert"))
      for line in c.source.splitlines()
    )
  ]
  assert checks, (
    f"{path.name} has no cell that asserts on its results; "
    "add `assert` lines that check what it prints."
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_smoke_mode(path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_SMOKE", "1")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    extra_arguments=KERNEL_ARGS,
    # The kernel is done when the last cell is: no graceful shutdown wait.
    shutdown_kernel="immediate",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()  # raises CellExecutionError with the failing cell
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "error"
  ]
  assert not errors
  # Every figure cell produced an image.
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if "image/png" in o.get("data", {})
  ]
  assert images, f"{path.name} displayed no figure"
