"""Evaluation cuts a batch's prompts to its longest one (`generation.prompt_bucket`) and
batches examples by history length (`evaluate.rank_examples`): a speed change that must not
change any ranking.

Synthetic catalogue and tokenizer (`conftest.synthetic_assets`), random-init tiny model: no work
directory.
"""
import types

import numpy as np
import pytest
from flax import nnx

from sigma_jax.eval import evaluate
from sigma_jax.generate import generator as gen_lib
from sigma_jax.train import sft

from conftest import synthetic_assets

ITEMS = 40


def _generator(mode: str, bucket: int):
  cfg, assets = synthetic_assets(mode, items=ITEMS)
  cfg.generation.prompt_bucket = bucket
  graphdef, params = nnx.split(sft._new_model(cfg, assets))
  return gen_lib.Generator(cfg, assets, graphdef, params)


def test_trim_cuts_only_padding():
  mask = np.zeros((3, 64), bool)
  for r, n in enumerate((5, 17, 9)):
    mask[r, :n] = True
  tokens = np.where(mask, 7, 0).astype(np.int32)
  arrays = {"tokens": tokens, "inject_items": np.full((3, 64), -1, np.int32),
            "attn_mask": mask, "other": np.zeros(3)}
  out = gen_lib.trim_prompts(arrays, 16)
  assert out["tokens"].shape == (3, 32)  # 17 real tokens at most -> 32
  assert out["attn_mask"].sum() == mask.sum()  # every real token kept
  np.testing.assert_array_equal(out["tokens"], tokens[:, :32])
  assert out["other"] is arrays["other"]
  assert gen_lib.trim_prompts(arrays, 0) is arrays
  assert gen_lib.trim_prompts(arrays, 100)["tokens"].shape == (3, 64)  # never longer than T


@pytest.mark.parametrize("mode", ["sigma", "gr_sid", "gr_id"])
def test_trimmed_prompts_rank_the_same(mode):
  """Cut to multiples of 4 or kept at sft.max_len, the same items with the same scores."""
  rng = np.random.default_rng(1)
  hist = [rng.choice(ITEMS, n, replace=False) for n in (1, 3, 6, 2)]
  hist = np.stack([np.concatenate([np.full(6 - len(h), -1), h]) for h in hist]).astype(np.int32)
  instr = [[900, 901]] * len(hist)
  full = _generator(mode, 0)
  trimmed = _generator(mode, 4)
  assert trimmed.prompts(hist, instr)["tokens"].shape[1] == full.cfg.sft.max_len
  a = full.recommend(hist, instr)
  b = trimmed.recommend(hist, instr)
  np.testing.assert_array_equal(a.items, b.items)
  assert (np.asarray(a.items) >= 0).any()
  np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-4, atol=1e-5)


class _Recorder:
  """A generator stand-in: item 0 of each row's list is its history's last item."""

  def __init__(self):
    self.spec = types.SimpleNamespace(top_n=3)
    self.batches = []

  def recommend(self, histories, instructions, allowed, tau=None):
    self.batches.append((np.asarray(histories) >= 0).sum(axis=1))
    items = np.tile(np.asarray(histories)[:, -1:], (1, 3))
    return types.SimpleNamespace(items=items)


def test_rank_examples_sorts_by_length_and_keeps_order():
  lengths = [5, 1, 4, 1, 3, 2, 5]
  hist = np.full((len(lengths), 5), -1, np.int32)
  for r, n in enumerate(lengths):
    hist[r, 5 - n:] = 100 + r  # the last item names the example
  ex = types.SimpleNamespace(target=np.zeros(len(lengths)), history=hist, task="justforyou",
                             split="validation", hard_constraint=False,
                             instruction=[""] * len(lengths))
  rec = _Recorder()
  out = evaluate.rank_examples(rec, ex, batch_size=3)
  np.testing.assert_array_equal(out[:, 0], 100 + np.arange(len(lengths)))  # input order
  # Batches of similar length: [1, 1, 2], [3, 4, 5], [5, pad 5, pad 5].
  assert [b.tolist() for b in rec.batches] == [[1, 1, 2], [3, 4, 5], [5, 5, 5]]
  assert evaluate.rank_examples(rec, ex, batch_size=3, limit=0).shape == (0, 3)
