"""collab's per-example ranks (`compare.collab_ranks`): the paired bootstrap of sigma against
SASRec pairs the same JustForYou examples, and the ranks reproduce the collab row's metrics."""
import os

import numpy as np

from configs import demo as demo_config
from sigma_jax import workdir as wd
from sigma_jax.data import loader, tasks
from sigma_jax.eval import compare, metrics as M


def test_collab_ranks_reproduce_its_row_and_pair_with_sigma(demo_workdir, tmp_path):
  cfg = demo_config.get_config()
  cfg.progress = False
  work = tmp_path / "work"
  os.makedirs(work)
  for st in ("data", "tfds", "collab"):  # collab's ranks need these stages only
    os.symlink(wd.stage_dir(demo_workdir, st), wd.stage_dir(str(work), st))
  ranks = compare.collab_ranks(cfg, str(work))
  ds = loader.load_dataset(cfg, str(work))
  row = compare.collab_row(cfg, str(work))
  for split in ("validation", "test"):
    ex = tasks.build_tasks(ds, cfg.tasks, split, tasks=["justforyou"])["justforyou"]
    r = ranks[f"justforyou/{split}"]
    assert r.shape == (len(ex),) and r.min() >= -1 and r.max() < 20
    # The same examples the collab stage ranked: its NDCG@10 and R@10 come back.
    assert np.isclose(M.ndcg_per_example(r, 10).mean(), row[split]["ndcg@10"], atol=1e-6)
    assert np.isclose(((r >= 0) & (r < 10)).mean(), row[split]["recall@10"], atol=1e-6)
  saved = np.load(wd.path(compare.row_dir(str(work), "collab"), wd.EVAL_RANKS))
  np.testing.assert_array_equal(saved["justforyou/test"], ranks["justforyou/test"])
  # With a sigma row's ranks beside them, collab gets its interval (sigma minus collab).
  sig = wd.path(compare.row_dir(str(work), "sigma"), wd.EVAL_RANKS)
  os.makedirs(os.path.dirname(sig))
  np.savez(sig, **{"justforyou/test": np.zeros(len(ranks["justforyou/test"]), np.int64)})
  out = compare.paired(str(work), {"collab": {}, "sigma": {}})
  jfy = out["rows"]["collab"]["justforyou"]
  want = 1.0 - M.ndcg_per_example(ranks["justforyou/test"], 10).mean()
  assert np.isclose(jfy["diff"], want) and not out["missing"]
  # A limit applies to collab's examples as to the generative rows'.
  cfg.generation.eval_limit = 7
  assert compare.collab_ranks(cfg, str(work))["justforyou/test"].shape == (7,)
