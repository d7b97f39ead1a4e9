"""One step of every training stage, and one generation call, on 1 and on 8 (fake) devices.

The steps are the stages' own jitted functions (`collab.make_train_step`,
`ground.make_train_step`, `sft.make_train_step`, `generator.generate`) on the demo run's data; the
8-device mesh is data=2, fsdp=2, model=2, so parameters, optimizer states and batches are really
split. Sharding may reorder float reductions, hence the 1e-5 tolerance.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import demo
from sigma_jax import parallel
from sigma_jax.data import loader, pairs, text
from sigma_jax.generate import generator as gen_lib
from sigma_jax.models import grounding
from sigma_jax.train import collab, ground, optim, sft

TOL = dict(rtol=1e-5, atol=1e-5)


def _meshes():
  return {1: parallel.make_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1]),
          8: parallel.make_mesh(dict(data=2, fsdp=2, model=2))}


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_close(a: dict, b: dict, noise: tuple = (), noise_atol: float = 0.0):
  """All entries within TOL, except those named by a `noise` substring: within `noise_atol`."""
  assert a.keys() == b.keys()
  bad = {}
  for k in a:
    tol = dict(rtol=0.0, atol=noise_atol) if any(s in k for s in noise) else TOL
    if not np.allclose(a[k], b[k], **tol):
      bad[k] = float(np.max(np.abs(a[k] - b[k])))
  assert not bad, bad


@pytest.fixture(scope="module")
def setup(demo_workdir):
  cfg = demo.get_config()
  ds = loader.load_dataset(cfg, demo_workdir)
  return cfg, ds, demo_workdir


@pytest.mark.slow
def test_collab_step(setup):
  cfg, ds, _ = setup
  c = cfg.collab
  n = ds.num_items
  inputs, targets = collab.build_examples(ds.splits.train_seqs, int(c.max_len))
  bs = int(c.batch_size)
  host = collab.make_batch(inputs[:bs], targets[:bs], bs)
  tx = collab.make_optimizer(float(c.learning_rate), float(c.weight_decay))
  graphdef, params = nnx.split(collab.build_model(n, c, int(cfg.seed)), nnx.Param)
  params = jax.tree.map(np.asarray, params)  # host copies: the step donates its state
  step_fn = collab.make_train_step(graphdef, tx)
  out = {}
  for count, mesh in _meshes().items():
    repl = NamedSharding(mesh, P())
    state = jax.device_put({"params": params, "opt_state": tx.init(params),
                            "step": jnp.zeros((), jnp.int32)}, repl)
    batch = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")) if k != "positions"
                                                else P())) for k, v in host.items()}
    # The stage's RBG key (its dropout masks do not depend on how the batch is split).
    state, m = step_fn(state, batch, jax.random.key(int(cfg.seed) + 1, impl="rbg"))
    out[count] = (_flat(m), _flat(state["params"]))
  _assert_close(out[1][0], out[8][0])
  # SASRec's key bias gets a gradient that is zero in exact arithmetic (softmax ignores a shift
  # shared by all keys of a query): it is rounding noise, ~1e-10, that Adam rescales to updates
  # of up to the learning rate, in a different direction for each summation order.
  _assert_close(out[1][1], out[8][1], noise=("['k']['bias']",),
                noise_atol=float(c.learning_rate))


@pytest.mark.slow
def test_ground_step(setup):
  cfg, ds, workdir = setup
  g = cfg.ground
  n = ds.num_items
  tok = text.TextTokenizer(text.model_path(workdir))
  v_id = grounding.l2_normalize(jnp.asarray(ground.load_item_id_embeddings(workdir, n)))
  ids, mask = ground.item_text_tokens(tok, ds.raw.items, int(cfg.text.max_item_tokens))
  pr = pairs.sample_pairs(pairs.build_pools(ds, g, 0), int(g.batch_pairs), 0, 0)
  items = np.concatenate([pr[:, 0], pr[:, 1]]).astype(np.int32)
  host = {"tokens": ids[items], "mask": mask[items], "items": items}
  model_cfg = ground._model_cfg(cfg, tok.spm_size)
  rules = cfg.axis_rules
  out = {}
  for count, mesh in _meshes().items():
    graphdef, params = parallel.init_sharded(
        lambda: grounding.TextTower(model_cfg, int(g.out_dim), rngs=nnx.Rngs(0)), mesh, rules)
    param_sh = parallel.state_shardings(params, mesh, rules)
    tx, _ = optim.make_optimizer(g.learning_rate, g.warmup_steps, g.steps, g.weight_decay)
    repl = parallel.replicated(mesh)
    state_sh = {"params": param_sh, "opt": parallel.optimizer_shardings(tx, params, param_sh,
                                                                        mesh),
                "step": repl, "best_emb": repl}
    state = {"params": params, "opt": jax.jit(tx.init, out_shardings=state_sh["opt"])(params),
             "step": jnp.zeros((), jnp.int32), "best_emb": jnp.zeros((1, 1), jnp.float32)}
    batch = parallel.shard_batch(host, mesh, rules)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    step_fn = ground.make_train_step(graphdef, tx, v_id, float(g.tau), float(g.kd_weight), mesh,
                                     rules, state_sh, batch_sh)
    state, m = step_fn(state, batch)
    out[count] = (_flat(m), _flat(state["params"]))
  _assert_close(out[1][0], out[8][0])
  _assert_close(out[1][1], out[8][1])


@pytest.fixture(scope="module")
def sft_assets(setup):
  cfg, ds, workdir = setup
  return sft.load_assets(cfg, workdir)


@pytest.mark.slow
def test_sft_step(setup, sft_assets):
  cfg, ds, _ = setup
  assets = sft_assets
  examples, _ = sft.training_examples(cfg, ds, assets)
  bs = int(cfg.sft.batch_size)
  idx = loader.index_batches(len(examples), bs, 0)[0]
  rules = cfg.axis_rules

  def one_step(mesh, host):
    graphdef, state, state_sh, tx, _ = sft.init_state(cfg, assets, mesh, 100)
    batch = parallel.shard_batch(host, mesh, rules)
    feats = jax.device_put(jnp.asarray(assets.feats), parallel.replicated(mesh))
    step_fn = sft.make_train_step(graphdef, tx, float(cfg.sft.mu), float(cfg.sft.tau), mesh,
                                  rules, state_sh, jax.tree.map(lambda x: x.sharding, batch))
    state, m = step_fn(state, batch, feats)
    return _flat(m), _flat(state["params"])

  host = sft.make_batch(examples, idx, assets, cfg, np.random.default_rng(0))
  out = {count: one_step(mesh, host) for count, mesh in _meshes().items()}
  _assert_close(out[1][0], out[8][0])
  _assert_close(out[1][1], out[8][1])

  # Packed (sft.pack) on the 8-device mesh: its R rows split over data x fsdp = 4 like the
  # batch's, and the flat indices reach across shards; the step is the unpacked one.
  mesh = _meshes()[8]
  assert sft.pack_rows(cfg, mesh) == 4
  host = sft.make_batch(examples, idx, assets, cfg, np.random.default_rng(0),
                        pack_multiple=sft.pack_rows(cfg, mesh))
  assert len(host["tokens"]) % 4 == 0 and len(host["q_item"]) == bs
  packed = one_step(mesh, host)
  _assert_close(out[1][0], packed[0])
  _assert_close(out[1][1], packed[1])


def test_generate(setup, sft_assets):
  cfg, ds, workdir = setup
  assets = sft_assets
  hist = ds.splits.test_hist[:4]
  instr = [[]] * len(hist)
  out = {}
  for count, mesh in _meshes().items():
    graphdef, params, _ = sft.load_params(cfg, workdir, assets, mesh)
    gen = gen_lib.Generator(cfg, assets, graphdef, params)
    r = gen.recommend(hist, instr)
    out[count] = r
  np.testing.assert_array_equal(out[1].items, out[8].items)
  np.testing.assert_allclose(out[1].scores, out[8].scores, **TOL)
  assert (out[1].items >= 0).any()


@pytest.mark.slow
def test_catalogue_negatives_is_a_full_softmax(setup, sft_assets):
  """sft.id_negatives='catalogue': L_ID is the cross-entropy of each <q> state against all N item
  keys (checked against NumPy on the model's own q states and keys)."""
  from sigma_jax.models import sigma as sigma_model
  cfg, ds, _ = setup
  assets = sft_assets
  examples, _ = sft.training_examples(cfg, ds, assets)
  batch = sft.make_batch(examples, np.arange(8), assets, cfg, np.random.default_rng(0))
  mesh = _meshes()[1]
  graphdef, state, *_ = sft.init_state(cfg, assets, mesh, 100)
  model = nnx.merge(graphdef, state["params"])
  feats = jnp.asarray(assets.feats)
  tau = float(cfg.sft.tau)
  _, m = sigma_model.sft_loss(model, batch, feats, 1.0, tau, "catalogue")
  h = model.hidden(batch["tokens"], batch["inject_items"], batch["attn_mask"], feats)
  q_pos = np.maximum(batch["q_pos"], 0)
  q = np.asarray(model.query(jnp.take_along_axis(h, q_pos[..., None], axis=1)))
  keys = np.asarray(model.item_keys(feats), np.float64)
  items = batch["q_item"]
  logits = q.reshape(-1, q.shape[-1]).astype(np.float64) @ keys.T / tau
  valid = items.reshape(-1) >= 0
  logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  ce = logz - logits[np.arange(len(logits)), np.maximum(items.reshape(-1), 0)]
  assert valid.sum() > 8  # every-position JustForYou: several queries per example
  np.testing.assert_allclose(float(m["id"]), ce[valid].mean(), rtol=1e-4)
  _, m_batch = sigma_model.sft_loss(model, batch, feats, 1.0, tau, "batch")
  assert float(m_batch["id"]) < float(m["id"])  # fewer negatives, an easier task
  with pytest.raises(ValueError, match="negatives"):
    sigma_model.sft_loss(model, batch, feats, 1.0, tau, "some")
