"""The `popular` row: the most popular training items, scored by the same metrics code."""
import os

import numpy as np
import pytest

from configs import demo as demo_config
from sigma_jax import utils, workdir as wd
from sigma_jax.data import loader, tasks
from sigma_jax.eval import compare, evaluate, metrics as M, popular


@pytest.fixture(scope="module")
def setup(demo_workdir):
  cfg = demo_config.get_config()
  cfg.progress = False
  return cfg, loader.load_dataset(cfg, demo_workdir)


_ORDER = {}


def _by_hand(ds, history, allowed=None, exclude=True, n=20):
  """The top-n by training popularity (ties: lower index), computed without the library."""
  if id(ds) not in _ORDER:
    counts = {}
    for seq in ds.splits.train_seqs:
      for i in seq:
        counts[int(i)] = counts.get(int(i), 0) + 1
    _ORDER[id(ds)] = sorted(range(ds.num_items), key=lambda i: (-counts.get(i, 0), i))
  items = _ORDER[id(ds)]
  banned = {int(h) for h in history if h >= 0} if exclude else set()
  return [i for i in items if i not in banned and (allowed is None or allowed[i])][:n]


def test_popular_lists_equal_a_hand_ranking(setup):
  cfg, ds = setup
  ranker = popular.PopularRanker(cfg, ds)
  assert ranker.exclude_history == bool(cfg.dataset.exclude_history)
  for task in ("justforyou", "category", "query"):
    ex = tasks.build_tasks(ds, cfg.tasks, "validation", tasks=[task])[task]
    rows = np.arange(5)
    allowed = ex.allowed_batch(rows) if ex.hard_constraint else None
    got = ranker.recommend(ex.history[rows], [ex.instruction[i] for i in rows], allowed).items
    assert got.shape == (5, cfg.generation.top_n)
    for r in rows:
      want = _by_hand(ds, ex.history[r], None if allowed is None else allowed[r],
                      exclude=cfg.dataset.exclude_history, n=cfg.generation.top_n)
      assert got[r].tolist() == want, (task, r)
  # Without history exclusion the history items come back (the most popular are in histories).
  plain = popular.PopularRanker(cfg, ds, exclude_history=False)
  ex = tasks.build_tasks(ds, cfg.tasks, "validation", tasks=["justforyou"])["justforyou"]
  got = plain.recommend(ex.history[:3], ex.instruction[:3]).items
  assert got[0].tolist() == _by_hand(ds, ex.history[0], exclude=False)


def test_popular_row_metrics(setup, demo_workdir, tmp_path):
  """The row's metrics are evaluate's metrics of the hand ranking, and it needs no model."""
  cfg, ds = setup
  # A work directory with only the data stage: the row must not need any other stage.
  work = tmp_path / "work"
  os.makedirs(work)
  for st in ("data", "tfds"):
    os.symlink(wd.stage_dir(demo_workdir, st), wd.stage_dir(str(work), st))
  row = compare.popular_row(cfg, str(work))
  saved = utils.read_json(wd.path(compare.row_dir(str(work), "popular"), wd.EVAL_METRICS))
  assert set(row) == {"validation", "test"} and saved["mode"] == "popular"
  assert set(row["validation"]) == set(tasks.available_tasks(ds)[0])  # the demo: per task
  limit = int(cfg.generation.eval_limit) or None
  for task in ("justforyou", "category"):
    ex = tasks.build_tasks(ds, cfg.tasks, "validation", tasks=[task])[task]
    m = len(ex) if limit is None else min(limit, len(ex))
    ranked = np.full((m, cfg.generation.top_n), -1, np.int32)
    for i in range(m):
      lst = _by_hand(ds, ex.history[i], ex.allowed(i) if ex.hard_constraint else None,
                     exclude=cfg.dataset.exclude_history, n=cfg.generation.top_n)
      ranked[i, :len(lst)] = lst
    want = M.ranking_metrics(ranked, ex.target[:m], evaluate.KS, num_items=ds.num_items)
    got = row["validation"][task]
    assert got["num_examples"] == m
    for k, v in want.items():
      assert got[k] == pytest.approx(v), (task, k)
    if task == "category":
      assert got["constraint_satisfaction@10"] == 1.0
  # Per-example ranks for the paired bootstrap.
  ranks = np.load(wd.path(compare.row_dir(str(work), "popular"), wd.EVAL_RANKS))
  assert "justforyou/test" in ranks and "justforyou/validation" in ranks
