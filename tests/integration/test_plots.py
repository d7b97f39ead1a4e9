"""`python -m launch.plots` writes non-trivial PNGs of the trained demo work directory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SUBPROCESS_XLA_FLAGS

pytestmark = pytest.mark.slow

# The notebook sweeps the same τ values and limit, so whichever runs second reuses the sweep
# cached in plots/apf_tradeoff.json.
TAUS, LIMIT = "0.001,0.01,0.1,1.0", "32"


def _check_png(path):
  from PIL import Image
  assert os.path.getsize(path) > 5000, path
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.width >= 300 and im.height >= 200, (path, im.size)
    pixels = np.asarray(im.convert("L"), np.float32)
  # A drawn figure, not a blank canvas: many pixels differ from the background.
  assert (np.abs(pixels - np.median(pixels)) > 30).mean() > 0.005, path
  assert len(np.unique(pixels)) > 10, path


def test_plots(demo_workdir, tmp_path_factory):
  env = dict(os.environ)
  env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
  env["JAX_PLATFORMS"] = "cpu"
  # Shared with the recommend and notebook tests: compiled programs are reused.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
  out = subprocess.run([sys.executable, "-m", "launch.plots", f"--workdir={demo_workdir}",
                        f"--taus={TAUS}", f"--limit={LIMIT}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  paths = json.loads(out.stdout)
  expected = {"curves_collab", "curves_ground", "curves_sft", "codebook_usage", "apf_tradeoff"}
  assert expected <= set(paths), paths
  for name, path in paths.items():
    assert os.path.dirname(path) == os.path.join(demo_workdir, "plots")
    _check_png(path)
  with open(os.path.join(demo_workdir, "plots", "apf_tradeoff.json")) as f:
    sweep = json.load(f)
  assert sweep["taus"] == [0.001, 0.01, 0.1, 1.0]
  assert {"justforyou", "category", "longtail"} <= set(sweep["tasks"])
  for row in sweep["tasks"].values():
    assert len(row["hr@10"]) == len(row["category_coverage@10"]) == 4
    assert all(0.0 <= v <= 1.0 for v in row["hr@10"] + row["category_coverage@10"])


def test_training_curves_drop_a_torn_last_line(tmp_path):
  """plots reads metrics logs with utils.read_jsonl: blank lines are skipped, and a line torn by
  a kill (always the last: a resumed stage rewrites its log first) ends the records."""
  from sigma_jax import plots, utils

  log = tmp_path / "sft" / "metrics.jsonl"
  os.makedirs(log.parent)
  log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n'
                 '{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
  assert [r["step"] for r in utils.read_jsonl(str(log))] == [1, 2, 3]
  (path,) = plots.training_curves(str(tmp_path))
  assert os.path.basename(path) == "curves_sft.png" and os.path.getsize(path) > 1000
