"""`sft.layout='one_pass'`: the per-position examples, each user's history computed once for all
its positions (`prompts.pack` with shared histories, the decoder's branch mask), give every
example the hidden states, loss and gradients of its own per-position prompt."""
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


@pytest.fixture(scope="module")
def batches(demo_workdir):
  """(cfg, assets, per-position batch unpacked, the same examples one_pass-packed)."""
  cfg = demo.get_config()
  cfg.sft.layout = "one_pass"
  assets = sft.load_assets(cfg, demo_workdir)
  ds = loader.load_dataset(cfg, demo_workdir)
  examples, _ = sft.training_examples(cfg, ds, assets)
  order = loader.grouped_batches([ex.group for ex in examples], 32, 0)
  idx = order[1]
  per_position = demo.get_config()
  per_position.sft.layout = "per_position"
  plain = sft.make_batch(examples, idx, assets, per_position, np.random.default_rng(3))
  shared = sft.make_batch(examples, idx, assets, cfg, np.random.default_rng(3), pack_multiple=2)
  return cfg, assets, examples, idx, plain, shared


def test_same_examples_as_per_position(demo_workdir):
  cfg = demo.get_config()
  assets = sft.load_assets(cfg, demo_workdir)
  ds = loader.load_dataset(cfg, demo_workdir)
  cfg.sft.layout = "per_position"
  per_position, counts_a = sft.training_examples(cfg, ds, assets)
  cfg.sft.layout = "one_pass"
  one_pass, counts_b = sft.training_examples(cfg, ds, assets)
  assert counts_a == counts_b
  assert [(e.task, e.target, tuple(e.history), tuple(e.instruction)) for e in per_position] == \
      [(e.task, e.target, tuple(e.history), tuple(e.instruction)) for e in one_pass]
  assert all(e.group < 0 for e in per_position) and all(e.group >= 0 for e in one_pass)


def test_grouped_batches_keep_groups_together_and_cover_each_epoch():
  groups = np.array([0, 0, 0, -1, 1, 1, -1, 2, 2, 2, 2, -1])
  order = loader.grouped_batches(groups, 4, seed=5)
  flat = np.concatenate([order[s] for s in range(6)])  # two epochs of 12
  for epoch in (flat[:12], flat[12:]):
    assert sorted(epoch) == list(range(12))
    for g in (0, 1, 2):  # a group's records are consecutive, in their given order
      where = np.flatnonzero(groups[epoch] == g)
      np.testing.assert_array_equal(np.diff(where), 1)
      np.testing.assert_array_equal(epoch[where], np.flatnonzero(groups == g))
  assert not np.array_equal(flat[:12], flat[12:])  # a new permutation each epoch
  np.testing.assert_array_equal(loader.grouped_batches(groups, 4, seed=5)[4], order[4])


def test_histories_are_shared(batches):
  _, _, examples, idx, plain, shared = batches
  lengths = plain["attn_mask"].sum(1)
  groups = np.array([examples[i].group for i in idx])
  assert len(set(groups)) < len(groups)  # the batch holds positions of the same user
  assert shared["attn_mask"].sum() < lengths.sum()  # ... whose history is computed once
  assert (shared["branch_ids"] > 0).any()
  for k in ("ntp_tgt", "ntp_w", "q_item", "hard"):
    np.testing.assert_array_equal(shared[k], plain[k])


@pytest.mark.slow
def test_hidden_states_loss_and_gradients_equal_per_position(batches):
  cfg, assets, _, _, plain, shared = batches
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
  graphdef, state, *_ = sft.init_state(cfg, assets, mesh, 10)
  feats = jnp.asarray(assets.feats)

  def targets_hidden(params, batch):
    """Hidden states at every example's target positions: [B, P, D] and [B, Q, D]."""
    model = nnx.merge(graphdef, params)
    h = model.hidden(batch["tokens"], batch["inject_items"], batch["attn_mask"], feats,
                     segment_ids=batch.get("segment_ids"), branch_ids=batch.get("branch_ids"),
                     positions=batch.get("positions"))
    if "segment_ids" in batch:
      flat = h.reshape(-1, h.shape[-1])
      return flat[batch["ntp_pos"]], flat[batch["q_pos"]]
    rows = jnp.arange(len(h))[:, None]
    return h[rows, batch["ntp_pos"]], h[rows, batch["q_pos"]]

  @jax.jit
  def loss_and_grads(params, batch):
    fn = lambda p: sigma_model.sft_loss(nnx.merge(graphdef, p), batch, feats,
                                        float(cfg.sft.mu), float(cfg.sft.tau))
    return jax.value_and_grad(fn, has_aux=True)(params)

  ntp_a, q_a = jax.jit(targets_hidden)(state["params"], plain)
  ntp_b, q_b = jax.jit(targets_hidden)(state["params"], shared)
  w = plain["ntp_w"] > 0
  q = plain["q_item"] >= 0
  np.testing.assert_allclose(np.asarray(ntp_b)[w], np.asarray(ntp_a)[w], atol=1e-5)
  np.testing.assert_allclose(np.asarray(q_b)[q], np.asarray(q_a)[q], atol=1e-5)

  (loss_a, m_a), g_a = loss_and_grads(state["params"], plain)
  (loss_b, m_b), g_b = loss_and_grads(state["params"], shared)
  for k in m_a:
    np.testing.assert_allclose(float(m_b[k]), float(m_a[k]), rtol=1e-5, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))

  # Without the branch mask the positions of one user see each other's instructions and
  # targets: another loss. The equality above depends on the mask.
  leaky = dict(shared, branch_ids=np.zeros_like(shared["branch_ids"]))
  (loss_c, _), _ = loss_and_grads(state["params"], leaky)
  assert abs(float(loss_c) - float(loss_a)) > 1e-3 * abs(float(loss_a))


def test_a_history_that_is_not_a_prefix_is_refused():
  t = 8
  batch = {"tokens": np.array([[1, 2, 3, 9, 9, 0, 0, 0], [1, 5, 3, 4, 9, 9, 0, 0]]),
           "inject_items": np.full((2, t), -1), "attn_mask": np.zeros((2, t), bool),
           "ntp_pos": np.array([[4], [5]]), "ntp_tgt": np.ones((2, 1), np.int32),
           "ntp_w": np.ones((2, 1), np.float32), "q_pos": np.zeros((2, 1), np.int32),
           "q_item": np.full((2, 1), -1), "hard": np.full((2, 1, 0), -1)}
  batch["attn_mask"][0, :5] = batch["attn_mask"][1, :6] = True
  with pytest.raises(ValueError, match="not a prefix"):
    prompts.pack(batch, groups=[0, 0], trunk_len=[3, 4])
