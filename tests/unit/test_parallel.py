"""Mesh, logical sharding rules, sharded init, batch placement, 8-device vs 1-device training."""
import re

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from configs import base
from sigma_jax import parallel
from sigma_jax.models import backbone as bb

RULES = base.axis_rules()
MESH_222 = dict(data=2, fsdp=2, model=2)


def tiny(**overrides):
  cfg = base.backbone("tiny")
  cfg.vocab_size = 64
  cfg.update(overrides)
  return cfg


def test_make_mesh_sizes_and_axis_types():
  # The default mesh config of configs/base.py: data=-1 takes all 8 devices.
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
  assert dict(mesh.shape) == dict(data=8, fsdp=1, model=1)
  assert mesh.axis_types == (AxisType.Auto,) * 3
  mesh = parallel.make_mesh(dict(data=-1, fsdp=2, model=2))
  assert dict(mesh.shape) == MESH_222
  one = parallel.make_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
  assert one.devices.size == 1


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=3, model=1), "multiple of 3"),
    (dict(data=2, fsdp=2, model=1), "has 4 devices"),
    (dict(data=-1, fsdp=-1, model=1), "at most one"),
    (dict(data=0, fsdp=1, model=1), "positive"),
])
def test_make_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(sizes)


def test_logical_to_spec():
  assert parallel.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "model")
  assert parallel.logical_to_spec(("batch", None, "kv"), RULES) == P(("data", "fsdp"), None, None)
  # fsdp is taken by 'batch', so 'embed' is left unsharded.
  assert parallel.logical_to_spec(("batch", "length", "embed"), RULES) == P(
      ("data", "fsdp"), None, None)
  with pytest.raises(ValueError, match="no sharding rule"):
    parallel.logical_to_spec(("embedd",), RULES)


# Expected mesh PartitionSpec per parameter (layer index written as *), rules of configs/base.py.
GOLDEN = {
    "embedding": P("model", "fsdp"),
    "lm_head": P("fsdp", "model"),
    "final_norm/scale": P(None),
    "layers/*/attn_norm/scale": P(None),
    "layers/*/mlp_norm/scale": P(None),
    "layers/*/attn/q_proj": P("fsdp", "model", None),
    "layers/*/attn/k_proj": P("fsdp", "model", None),
    "layers/*/attn/v_proj": P("fsdp", "model", None),
    "layers/*/attn/o_proj": P("model", None, "fsdp"),
    "layers/*/attn/q_norm/scale": P(None),
    "layers/*/attn/k_norm/scale": P(None),
    "layers/*/mlp/gate": P("fsdp", "model"),
    "layers/*/mlp/up": P("fsdp", "model"),
    "layers/*/mlp/down": P("model", "fsdp"),
}


def test_parameter_partition_specs_golden():
  mesh = parallel.make_mesh(MESH_222)
  cfg = tiny(tie_embeddings=False)
  _, state = parallel.init_sharded(lambda: bb.Decoder(cfg, rngs=nnx.Rngs(0)), mesh, RULES)
  specs = dict(nnx.to_flat_state(parallel.state_specs(state, RULES)))
  seen = set()
  for path, var in nnx.to_flat_state(state):
    key = re.sub(r"/\d+/", "/*/", "/".join(map(str, path)))
    assert key in GOLDEN, f"parameter {key} missing from the golden table"
    seen.add(key)
    assert specs[path].get_value() == GOLDEN[key], (key, specs[path].get_value())
    # Born sharded as the table says.
    assert var[...].sharding.spec == GOLDEN[key], (key, var[...].sharding)
    assert var[...].sharding.mesh == mesh
  assert seen == set(GOLDEN)
  emb = dict(nnx.to_flat_state(state))[("embedding",)][...]
  assert emb.addressable_shards[0].data.shape == (32, 16)  # [V/model, D/fsdp]


def test_shard_batch():
  mesh = parallel.make_mesh(MESH_222)
  host = {"tokens": np.arange(4 * 5, dtype=np.int32).reshape(4, 5), "w": np.ones(4, np.float32)}
  batch = parallel.shard_batch(host, mesh, RULES)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert batch["w"].sharding.spec == P(("data", "fsdp"))
  assert batch["tokens"].addressable_shards[0].data.shape == (1, 5)
  np.testing.assert_array_equal(batch["tokens"], host["tokens"])


def _train(mesh, steps=3):
  """A few adamw steps of the LM loss on `mesh`; returns (losses, params as numpy, specs)."""
  cfg = tiny(tie_embeddings=False)
  graphdef, params = parallel.init_sharded(lambda: bb.Decoder(cfg, rngs=nnx.Rngs(0)), mesh,
                                           RULES)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  param_sh = parallel.state_shardings(params, mesh, RULES)
  opt_sh = parallel.optimizer_shardings(tx, params, param_sh, mesh)
  state = {"params": params, "opt": jax.jit(tx.init, out_shardings=opt_sh)(params)}
  state_sh = {"params": param_sh, "opt": opt_sh}

  rng = np.random.RandomState(0)
  toks = rng.randint(0, cfg.vocab_size, (4, 9)).astype(np.int32)
  mask = np.ones((4, 8), bool)
  mask[1, :2] = False  # a left-padded row
  host = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask,
          "weights": mask.astype(np.float32)}
  batch = parallel.shard_batch(host, mesh, RULES)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)

  def train_step(state, batch):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      hidden = model(batch["inputs"], attn_mask=batch["mask"])
      return bb.lm_loss(model.logits(hidden), batch["targets"], batch["weights"])
    with parallel.activation_sharding(mesh, RULES):
      loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0)
  losses = []
  for _ in range(steps):
    state, loss = step(state, batch)
    losses.append(float(loss))
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["params"])}
  specs = {p: v[...].sharding.spec for p, v in nnx.to_flat_state(state["params"])}
  return losses, flat, specs


@pytest.mark.slow
def test_sharded_training_matches_one_device():
  losses8, params8, specs8 = _train(parallel.make_mesh(MESH_222))
  losses1, params1, _ = _train(parallel.make_mesh(dict(data=1, fsdp=1, model=1),
                                                  devices=jax.devices()[:1]))
  assert specs8[("layers", 0, "mlp", "gate")] == P("fsdp", "model")  # stayed sharded
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
  assert losses8[-1] < losses8[0]
  assert params8.keys() == params1.keys()
  for path in params8:
    np.testing.assert_allclose(params8[path], params1[path], rtol=1e-5, atol=1e-5,
                               err_msg=str(path))


def test_kv_cache_shardings():
  mesh = parallel.make_mesh(MESH_222)
  cache = bb.init_cache(tiny(), 4, 16)
  cache = jax.device_put(cache, cache.shardings(mesh, RULES))
  assert cache.k[0].sharding.spec == P(("data", "fsdp"), None, "model", None)  # [B, S, KV, Dh]
  assert cache.valid.sharding.spec == P(("data", "fsdp"), None)
  assert cache.index.sharding.spec == P(("data", "fsdp"))


def test_fit_spec_replicates_dimensions_the_mesh_does_not_divide():
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, model=2), devices=jax.devices()[:8])
  # An odd vocabulary (1,055 rows) cannot be split over model = 2; d = 32 over fsdp = 2 can.
  assert parallel.fit_spec(P("model", "fsdp"), (1055, 32), mesh) == P(None, "fsdp")
  assert parallel.fit_spec(P("model", "fsdp"), (1056, 32), mesh) == P("model", "fsdp")
  assert parallel.fit_spec(P(("data", "fsdp"), None), (6, 3), mesh) == P(None, None)
  assert parallel.fit_spec(P(("data", "fsdp")), (8, 3), mesh) == P(("data", "fsdp"), None)
