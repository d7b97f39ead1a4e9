"""dataset.exclude_history: no generation mode returns an item of the user's own history."""
import numpy as np
import pytest

from configs import demo
from sigma_jax.eval import evaluate as eval_lib
from sigma_jax.generate import generator as gen_lib


@pytest.fixture(scope="module")
def loaded(demo_workdir):
  cfg = demo.get_config()
  cfg.generation.top_n = 10
  ds, gen, _ = eval_lib.load_generator(cfg, demo_workdir)
  hist = ds.splits.test_hist[:16]
  return cfg, ds, gen, hist


def _returned_history(ranked, hist):
  return sum(len(set(r[r >= 0]) & set(h[h >= 0])) for r, h in zip(np.asarray(ranked.items), hist))


@pytest.mark.parametrize("mode", ["sigma", "gr_id", "gr_sid"])
def test_no_history_item_is_returned(loaded, mode):
  cfg, _, gen, hist = loaded
  instr = ["Recommend the next item for this user."] * len(hist)
  g = gen_lib.Generator(cfg, gen.assets, gen.graphdef, gen.params, mode=mode,
                        exclude_history=True)
  out = g.recommend(hist, instr)
  assert _returned_history(out, hist) == 0
  items = np.asarray(out.items)
  for row in items:  # a full list, still duplicate-free
    filled = row[row >= 0]
    assert len(filled) == len(set(filled.tolist()))
  assert (items >= 0).sum() >= 0.9 * items.size
  if mode == "gr_sid":  # excluded inside the beam search (subset tries): every list is full
    assert (items >= 0).all()
