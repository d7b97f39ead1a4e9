"""Sequence packing for SFT (`sft.pack`, `prompts.pack`): several examples to a row, attention
kept inside each, gives the unpacked batch's loss and gradients over fewer rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from sigma_jax import parallel
from sigma_jax.data import loader, prompts
from sigma_jax.models import sigma as sigma_model
from sigma_jax.train import sft


@pytest.fixture(scope="module", params=["per_position", "sequence"])
def batches(request, demo_workdir):
  """(cfg, assets, unpacked batch, packed batch) of the demo run's first 16 training examples."""
  cfg = demo.get_config()
  cfg.sft.layout = request.param
  assets = sft.load_assets(cfg, demo_workdir)
  ds = loader.load_dataset(cfg, demo_workdir)
  examples, _ = sft.training_examples(cfg, ds, assets)
  idx = np.arange(16) % len(examples)
  plain = sft.make_batch(examples, idx, assets, cfg, np.random.default_rng(3))
  packed = sft.make_batch(examples, idx, assets, cfg, np.random.default_rng(3), pack_multiple=2)
  return cfg, assets, plain, packed


def test_pack_keeps_every_example(batches):
  _, _, plain, packed = batches
  b, t = plain["tokens"].shape
  r = len(packed["tokens"])
  assert r % 2 == 0 and r <= b
  assert packed["segment_ids"].shape == packed["tokens"].shape
  lengths = plain["attn_mask"].sum(1)
  assert packed["attn_mask"].sum() == lengths.sum()
  # Each segment of each row is one example's real tokens, in order.
  segs = sorted(
      tuple(packed["tokens"][row, packed["segment_ids"][row] == s])
      for row in range(r) for s in range(1, packed["segment_ids"][row].max() + 1))
  assert segs == sorted(tuple(plain["tokens"][i, :lengths[i]]) for i in range(b))
  # The flat indices point at the same tokens the per-row indices did.
  flat_tokens = packed["tokens"].reshape(-1)
  flat_inject = packed["inject_items"].reshape(-1)
  w = plain["ntp_w"] > 0
  rows = np.broadcast_to(np.arange(b)[:, None], plain["ntp_pos"].shape)
  np.testing.assert_array_equal(flat_tokens[packed["ntp_pos"]][w],
                                plain["tokens"][rows, plain["ntp_pos"]][w])
  q = plain["q_item"] >= 0
  rows = np.broadcast_to(np.arange(b)[:, None], plain["q_pos"].shape)
  np.testing.assert_array_equal(flat_tokens[packed["q_pos"]][q],
                                plain["tokens"][rows, plain["q_pos"]][q])
  np.testing.assert_array_equal(flat_inject[packed["q_pos"]][q],
                                plain["inject_items"][rows, plain["q_pos"]][q])
  for k in ("ntp_tgt", "ntp_w", "q_item", "hard"):
    np.testing.assert_array_equal(packed[k], plain[k])


@pytest.mark.slow
def test_packed_loss_and_gradients_equal_unpacked(batches):
  cfg, assets, plain, packed = batches
  if cfg.sft.layout == "per_position":  # short examples: packing saves rows
    assert len(packed["tokens"]) < len(plain["tokens"])
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
  graphdef, state, *_ = sft.init_state(cfg, assets, mesh, 10)
  feats = jnp.asarray(assets.feats)

  @jax.jit
  def loss_and_grads(params, batch):
    fn = lambda p: sigma_model.sft_loss(nnx.merge(graphdef, p), batch, feats,
                                        float(cfg.sft.mu), float(cfg.sft.tau))
    return jax.value_and_grad(fn, has_aux=True)(params)

  (loss_a, m_a), g_a = loss_and_grads(state["params"], plain)
  (loss_b, m_b), g_b = loss_and_grads(state["params"], packed)
  assert float(m_a["id"]) > 0 and float(m_a["ntp"]) > 0
  for k in m_a:
    np.testing.assert_allclose(float(m_b[k]), float(m_a[k]), rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=2e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b)):
    # atol 1e-5 (as the device tests): the packed rows sum an embedding row's gradient from its
    # tokens in another order, so a float32 sum of many terms may differ by ~2e-6.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))

  # The equality depends on the segment mask: the same rows read as one sequence per row (the
  # examples of a row attending to each other) give another loss, where rows hold several.
  if len(packed["tokens"]) < len(plain["tokens"]):
    joined = dict(packed, segment_ids=packed["attn_mask"].astype(np.int32))
    (loss_j, _), _ = loss_and_grads(state["params"], joined)
    assert abs(float(loss_j) - float(loss_a)) > 1e-3 * abs(float(loss_a))


def test_pack_needs_right_padding():
  batch = {"tokens": np.array([[0, 5, 6]]), "inject_items": np.full((1, 3), -1),
           "attn_mask": np.array([[False, True, True]])}
  with pytest.raises(ValueError, match="right-padded"):
    prompts.pack(batch)
