"""Stage collab on a tiny synthetic dataset: it learns, resumes exactly, and skips a done run."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sigma_jax.data.splits import PAD_ITEM, leave_one_out
from sigma_jax.models.sasrec import SASRec, next_item_loss
from sigma_jax.train.collab import build_examples, make_batch, train_collab

NUM_ITEMS = 60


def _splits():
  # Item i is always followed by item i+1 (mod N): a pattern the model can learn from history.
  rng = np.random.default_rng(0)
  seqs = []
  for _ in range(240):
    start, length = rng.integers(NUM_ITEMS), rng.integers(5, 10)
    seqs.append((start + np.arange(length)) % NUM_ITEMS)
  return leave_one_out(list(range(len(seqs))), seqs, NUM_ITEMS, max_history=8)


def _cfg():
  # Only the fields stage collab reads (the same names as configs/base.py's c.collab).
  return ml_collections.ConfigDict(dict(seed=0, dataset=dict(exclude_history=False), collab=dict(
      d_model=16, num_blocks=1, num_heads=2, dropout=0.1, max_len=8, epochs=2, batch_size=32,
      learning_rate=1e-2, weight_decay=0.0, eval_every=1, patience=10, select_metric="ndcg@10")))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, train_collab(_cfg(), _splits(), workdir, progress=False)


def test_examples_and_position_list():
  inputs, targets = build_examples([np.array([3, 4, 5]), np.array([7]),
                                    np.arange(10, 16)], max_len=4)
  np.testing.assert_array_equal(inputs, [[PAD_ITEM, PAD_ITEM, 3, 4], [11, 12, 13, 14]])
  np.testing.assert_array_equal(targets, [[PAD_ITEM, PAD_ITEM, 4, 5], [12, 13, 14, 15]])
  batch = make_batch(inputs, targets, batch_size=3, bucket=4)
  assert batch["inputs"].shape == (3, 4) and (batch["targets"][2] == PAD_ITEM).all()
  np.testing.assert_array_equal(batch["positions"], [2, 3, 4, 5, 6, 7, -1, -1])
  # Scoring only the listed positions gives the same loss as scoring all of them.
  @jax.jit
  def both(batch):
    model = SASRec(20, d_model=8, num_blocks=1, max_len=4, dropout_rate=0.0, rngs=nnx.Rngs(0))
    full, _ = next_item_loss(model, batch["inputs"], batch["targets"])
    part, _ = next_item_loss(model, batch["inputs"], batch["targets"],
                             positions=batch["positions"])
    return full, part
  full, part = both(batch)
  np.testing.assert_allclose(float(full), float(part), rtol=1e-6)


def test_learns_pattern(full_run):
  workdir, result = full_run
  # Chance recall@10 over 60 items is 1/6.
  assert result["validation"]["recall@10"] > 0.6, result["validation"]
  assert result["test"]["recall@10"] > 0.6, result["test"]
  assert result["validation"]["invalid@20"] == 0.0
  emb = np.load(os.path.join(workdir, "collab", "item_emb.npy"))
  assert emb.shape == (NUM_ITEMS, 16) and emb.dtype == np.float32
  with open(os.path.join(workdir, "collab", "metrics.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  assert [x["epoch"] for x in lines] == [1, 2]
  assert result["best_epoch"] == max(lines, key=lambda x: x["validation"]["ndcg@10"])["epoch"]


def test_resume_matches_uninterrupted_and_done_is_skipped(full_run, tmp_path):
  full_dir, full_result = full_run
  workdir = str(tmp_path)
  partial = train_collab(_cfg(), _splits(), workdir, progress=False, max_epochs_this_run=1)
  assert partial == {"finished": False, "epoch": 1}
  assert not os.path.exists(os.path.join(workdir, "collab", "result.json"))
  resumed = train_collab(_cfg(), _splits(), workdir, progress=False)
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "collab", "item_emb.npy")),
                                np.load(os.path.join(full_dir, "collab", "item_emb.npy")))
  assert resumed["best_epoch"] == full_result["best_epoch"]
  assert resumed["test"] == full_result["test"]
  mtime = os.path.getmtime(os.path.join(workdir, "collab", "item_emb.npy"))
  assert train_collab(_cfg(), _splits(), workdir, progress=False) == resumed
  assert os.path.getmtime(os.path.join(workdir, "collab", "item_emb.npy")) == mtime


def test_mask_history_ranks_history_items_last():
  import jax.numpy as jnp
  from sigma_jax.train.collab import mask_history
  scores = jnp.asarray([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
  hist = jnp.asarray([[-1, 0, 2], [-1, -1, 3]])
  out = np.asarray(mask_history(scores, hist))
  assert np.argsort(-out[0]).tolist()[:2] == [1, 3]  # items 0 and 2 are history
  assert np.argsort(-out[1]).tolist()[:3] == [2, 1, 0]
  assert out[0, 1] == 4.0 and out[1, 2] == 3.0  # others untouched
  assert np.isfinite(out).all()


def test_rescore_under_another_protocol(full_run):
  """A run trained with history items ranked normally, rescored with them excluded (and back)."""
  from sigma_jax.train.collab import rescore
  workdir, result = full_run
  assert result["exclude_history"] is False
  same = rescore(_cfg(), _splits(), workdir)
  assert same["best_epoch"] == result["best_epoch"]
  for split in ("validation", "test"):  # same protocol: exactly the stage's numbers
    assert same[split] == pytest.approx(result[split])
  cfg = _cfg()
  cfg.dataset = ml_collections.ConfigDict(dict(exclude_history=True))
  other = rescore(cfg, _splits(), workdir)
  assert other["exclude_history"] and not other["epoch_selected_with_exclude_history"]
  # The synthetic sequences never repeat an item, so excluding the history cannot hurt recall.
  assert other["test"]["recall@20"] >= result["test"]["recall@20"] - 1e-9
