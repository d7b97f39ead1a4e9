"""sft.similarity='dot': L_ID and retrieval score by unnormalised dot products, end to end."""
import numpy as np
import pytest

from configs import demo
from sigma_jax import parallel
from sigma_jax.data import loader
from sigma_jax.generate import generator as gen_lib
from sigma_jax.train import sft


@pytest.mark.slow
def test_dot_model_trains_and_generates(demo_workdir):
  cfg = demo.get_config()
  cfg.sft.similarity = "dot"
  cfg.generation.top_n = 10
  assets = sft.load_assets(cfg, demo_workdir)
  mesh = parallel.make_mesh(cfg.mesh)
  graphdef, state, state_sh, tx, _ = sft.init_state(cfg, assets, mesh, total_steps=10)
  ds = loader.load_dataset(cfg, demo_workdir)
  examples, _ = sft.training_examples(cfg, ds, assets)
  batch = sft.make_batch(examples, np.arange(8), assets, cfg, np.random.default_rng(0))
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim, cfg.axis_rules) for k, v in batch.items()}
  step = sft.make_train_step(graphdef, tx, 1.0, 0.07, mesh, cfg.axis_rules, state_sh, batch_sh,
                             "catalogue")
  feats = parallel.put_replicated(np.asarray(assets.feats), mesh)
  losses = []
  for _ in range(3):  # the same batch three times: the loss must fall
    state, m = step(state, parallel.shard_batch(batch, mesh, cfg.axis_rules), feats)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]

  gen = gen_lib.Generator(cfg, assets, graphdef, state["params"], exclude_history=True)
  assert gen.spec.normalize is False  # the decoder follows the model's similarity
  keys = np.asarray(gen.item_keys)
  assert np.ptp(np.linalg.norm(keys, axis=1)) > 1e-3  # keys keep their norms
  hist = ds.splits.test_hist[:8]
  out = gen.recommend(hist, ["Recommend the next item for this user."] * len(hist))
  items = np.asarray(out.items)
  for row, h in zip(items, hist):
    filled = row[row >= 0]
    assert len(filled) == len(set(filled.tolist())) and len(filled) >= 5
    assert not set(filled.tolist()) & set(h[h >= 0].tolist())
