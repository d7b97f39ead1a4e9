"""notebooks/sigma_colab.ipynb runs headless against the trained demo work directory."""
import os

import nbclient
import nbformat
import pytest

from conftest import ROOT, SUBPROCESS_XLA_FLAGS

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(ROOT, "notebooks", "sigma_colab.ipynb")


def test_notebook_runs(demo_workdir, monkeypatch, tmp_path_factory):
  # The kernel is a child process: it inherits this environment, on one CPU device.
  monkeypatch.setenv("SIGMA_NOTEBOOK_WORKDIR", demo_workdir)
  monkeypatch.setenv("XLA_FLAGS", SUBPROCESS_XLA_FLAGS)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # Shared with the recommend and plots tests: compiled programs are reused.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR",
                     str(tmp_path_factory.getbasetemp() / "jax_cache"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "a code cell did not run"
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  texts = [o.get("text", "") for o in outputs if o.output_type == "stream"]
  markdown = [o.data["text/markdown"] for o in outputs
              if o.output_type == "display_data" and "text/markdown" in o.data]
  # The per-task metrics table, with a row per evaluated task.
  table = next(m for m in markdown if m.startswith("| task |"))
  for task in ("justforyou", "category", "query", "longtail"):
    assert f"| {task} |" in table
  assert "test hr@10" in table
  # Recommendations with titles for several instructions, and the figures.
  joined = "".join(texts)
  assert f"work directory: {demo_workdir}" in joined
  assert joined.count("instruction: ") >= 5
  assert "Comedy" in joined or "Drama" in joined
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) >= 5
