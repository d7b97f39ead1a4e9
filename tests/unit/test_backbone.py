"""Decoder backbone: KV-cache decoding, causality, padding, injection, GQA, output layer, loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from sigma_jax.models import backbone as bb

V = 64  # small vocabulary keeps the tests fast


def tiny(**overrides):
  cfg = base.backbone("tiny")
  cfg.vocab_size = V
  cfg.max_len = 32
  cfg.update(overrides)
  return cfg


@functools.lru_cache(maxsize=None)
def split_model(tie=True, qk_norm=True, num_layers=2, num_kv_heads=2, seed=0):
  cfg = tiny(tie_embeddings=tie, qk_norm=qk_norm, num_layers=num_layers,
             num_kv_heads=num_kv_heads)
  return nnx.split(bb.Decoder(cfg, rngs=nnx.Rngs(seed)))


@functools.lru_cache(maxsize=None)
def jitted(graphdef):
  """Forward, cached-call and logits functions for one graphdef, compiled once per shape."""
  fwd = jax.jit(lambda p, tok, mask: bb.apply(graphdef, p, tok, attn_mask=mask))
  cached = jax.jit(lambda p, tok, mask, cache: bb.apply(graphdef, p, tok, attn_mask=mask,
                                                        cache=cache))
  step = jax.jit(lambda p, tok, cache: bb.apply(graphdef, p, tok, cache=cache, decode=True))
  logits = jax.jit(lambda p, h: bb.apply(graphdef, p, h, method="logits"))
  return fwd, cached, step, logits


@functools.lru_cache(maxsize=None)
def jitted_inject(graphdef):
  return jax.jit(lambda p, tok, inj, where: bb.apply(graphdef, p, tok, inject=inj,
                                                     inject_mask=where))


def tokens(b, t, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, V, (b, t)), jnp.int32)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_decode_matches_full_forward():
  gd, params = split_model()
  fwd, cached, step, logits = jitted(gd)
  toks = tokens(2, 8)
  full = fwd(params, toks, jnp.ones_like(toks, bool))  # [B, T, D]

  cache = bb.init_cache(tiny(), 2, 12)
  hidden, cache = cached(params, toks[:, :3], jnp.ones((2, 3), bool), cache)
  outs = [hidden]
  for t in range(3, 8):
    hidden, cache = step(params, toks[:, t:t + 1], cache)  # [B, 1, D]
    outs.append(hidden)
  decoded = jnp.concatenate(outs, axis=1)  # [B, T, D]
  close(decoded, full)
  close(logits(params, decoded), logits(params, full))
  np.testing.assert_array_equal(cache.index, [8, 8])
  np.testing.assert_array_equal(cache.pos, [8, 8])
  assert cache.k[0].shape == (2, 12, 2, 8)  # [B, S, KV, Dh]


@pytest.mark.parametrize("side", ["left", "right"])
def test_decode_with_padded_prompt(side):
  gd, params = split_model()
  fwd, cached, step, _ = jitted(gd)
  lengths, t_prompt, steps = [5, 3], 5, 3
  seqs = [np.asarray(tokens(1, n + steps, seed=i))[0] for i, n in enumerate(lengths)]
  prompt = np.zeros((2, t_prompt), np.int32) + 7  # pad id is arbitrary: it must never matter
  mask = np.zeros((2, t_prompt), bool)
  for i, n in enumerate(lengths):
    cols = slice(t_prompt - n, t_prompt) if side == "left" else slice(0, n)
    prompt[i, cols], mask[i, cols] = seqs[i][:n], True

  cache = bb.init_cache(tiny(), 2, 12)
  hidden, cache = cached(params, jnp.asarray(prompt), jnp.asarray(mask), cache)
  decoded = [bb.last_token_pool(hidden, jnp.asarray(mask))]
  for s in range(steps):
    nxt = jnp.asarray([[seqs[i][n + s]] for i, n in enumerate(lengths)], jnp.int32)
    hidden, cache = step(params, nxt, cache)
    decoded.append(hidden[:, 0])

  # Reference: each row unpadded from position 0 (tails past a row's end cannot matter: causal).
  full = np.zeros((2, 8), np.int32)
  for i, seq in enumerate(seqs):
    full[i, :len(seq)] = seq
  ref = fwd(params, jnp.asarray(full), jnp.ones((2, 8), bool))
  for i, n in enumerate(lengths):
    for s, h in enumerate(decoded):
      close(h[i], ref[i, n - 1 + s])
  np.testing.assert_array_equal(cache.pos, [n + steps for n in lengths])


def test_padding_is_never_attended():
  gd, params = split_model()
  fwd = jitted(gd)[0]
  toks = tokens(2, 6)
  mask = jnp.asarray([[False, False, True, True, True, True], [True] * 4 + [False] * 2])
  other = jnp.where(mask, toks, (toks + 1) % V)
  a, b = fwd(params, toks, mask), fwd(params, other, mask)
  np.testing.assert_array_equal(np.asarray(a)[np.asarray(mask)], np.asarray(b)[np.asarray(mask)])


def test_causal_mask():
  gd, params = split_model()
  fwd, _, _, logits = jitted(gd)
  toks = tokens(2, 8)
  changed = toks.at[:, 5].set((toks[:, 5] + 1) % V)
  ones = jnp.ones_like(toks, bool)
  a, b = logits(params, fwd(params, toks, ones)), logits(params, fwd(params, changed, ones))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.all(np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max(axis=-1) > 1e-6)


def test_injection_replaces_embeddings_exactly():
  # With no layers the hidden state is final_norm(input embedding), so the injected vectors can
  # be read back position by position.
  gd, params = split_model(num_layers=0)
  model = nnx.merge(gd, params)
  toks = tokens(2, 6)
  inject = jax.random.normal(jax.random.key(1), (2, 6, 32))
  where = jnp.asarray([[False, True, False, False, True, False], [True] + [False] * 5])
  hidden = model(toks, inject=inject, inject_mask=where)
  expected = jnp.where(where[..., None], model.final_norm(inject), model.final_norm(
      model.embed(toks)))
  np.testing.assert_array_equal(hidden, expected)


def test_injection_in_full_model():
  gd, params = split_model()
  fwd = jitted_inject(gd)
  toks = tokens(2, 8)
  plain = jitted(gd)[0](params, toks, jnp.ones_like(toks, bool))
  # Injecting each token's own embedding changes nothing.
  every_other = jnp.broadcast_to(jnp.arange(8)[None, :] % 2 == 0, (2, 8))
  own = nnx.merge(gd, params).embed(toks)
  # Not bitwise: the two calls are different compiled programs (fusion order differs).
  close(fwd(params, toks, own, every_other), plain)
  # A foreign vector at position 3 leaves earlier positions alone and changes position 3.
  where = jnp.zeros((2, 8), bool).at[:, 3].set(True)
  inject = jax.random.normal(jax.random.key(2), (2, 8, 32))
  out = fwd(params, toks, inject, where)
  same_program = fwd(params, toks, inject, jnp.zeros_like(where))
  close(same_program, plain)
  np.testing.assert_array_equal(out[:, :3], same_program[:, :3])
  assert np.all(np.abs(np.asarray(out[:, 3] - plain[:, 3])).max(axis=-1) > 1e-4)


def test_gqa_shapes_and_equivalence_with_repeated_heads():
  gd, params = split_model()
  model = nnx.merge(gd, params)
  attn = model.layers[0].attn
  assert attn.q_proj.shape == (32, 4, 8)  # [D, H, Dh]
  assert attn.k_proj.shape == attn.v_proj.shape == (32, 2, 8)  # [D, KV, Dh]
  assert attn.o_proj.shape == (4, 8, 32)  # [H, Dh, D]
  assert model.init_cache(3, 10).v[1].shape == (3, 10, 2, 8)

  # GQA equals multi-head attention whose k/v heads repeat each group's shared head.
  mha_gd, mha_params = split_model(num_kv_heads=4)
  mha_params = jax.tree.map(lambda x: x, mha_params)  # fresh Variables; the cached ones stay
  gqa = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(mha_params):
    value = gqa[path][...]
    if path[-1] in ("k_proj", "v_proj"):
      value = jnp.repeat(value, 2, axis=1)  # query head h reads kv head h // G
    var.set_value(value)
  toks = tokens(2, 7)
  ones = jnp.ones_like(toks, bool)
  close(jitted(mha_gd)[0](mha_params, toks, ones), jitted(gd)[0](params, toks, ones))


def test_tied_and_untied_output():
  for tie in (True, False):
    gd, params = split_model(tie=tie)
    model = nnx.merge(gd, params)
    fwd, _, _, logits = jitted(gd)
    toks = tokens(2, 5)
    hidden = fwd(params, toks, jnp.ones_like(toks, bool))
    flat = dict(nnx.to_flat_state(params))
    if tie:
      assert ("lm_head",) not in flat
      expected = hidden @ model.embedding[...].T
    else:
      assert flat[("lm_head",)].shape == (32, V)  # [D, V]
      expected = hidden @ model.lm_head[...]
    out = logits(params, hidden)
    assert out.shape == (2, 5, V) and out.dtype == jnp.float32
    close(out, expected)
  n_tied = sum(x.size for x in jax.tree.leaves(split_model(tie=True)[1]))
  n_untied = sum(x.size for x in jax.tree.leaves(split_model(tie=False)[1]))
  assert n_untied - n_tied == 32 * V


def test_no_qk_norm():
  gd, params = split_model(qk_norm=False)
  paths = ["/".join(map(str, k)) for k, _ in nnx.to_flat_state(params)]
  assert not any("q_norm" in p or "k_norm" in p for p in paths)
  toks = tokens(1, 4)
  assert jitted(gd)[0](params, toks, jnp.ones_like(toks, bool)).shape == (1, 4, 32)


def test_last_token_pool():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.asarray([[True, True, False, False], [False, True, True, True]])
  pooled = bb.last_token_pool(hidden, mask)
  np.testing.assert_array_equal(pooled, jnp.stack([hidden[0, 1], hidden[1, 3]]))


def test_lm_loss():
  logits = jnp.zeros((2, 3, V))
  targets = jnp.zeros((2, 3), jnp.int32)
  close(bb.lm_loss(logits, targets, jnp.ones((2, 3))), np.log(V))
  sharp = logits.at[0, 0, 0].set(100.0)
  weights = jnp.zeros((2, 3)).at[0, 0].set(1.0)
  close(bb.lm_loss(sharp, targets, weights), 0.0)
  assert bb.lm_loss(logits, targets, jnp.zeros((2, 3))) == 0.0


def test_memorisation():
  gd, params = split_model(seed=3)
  tx = optax.adamw(1e-2)
  toks = tokens(2, 9, seed=5)
  inp, tgt = toks[:, :-1], toks[:, 1:]
  w = jnp.ones(tgt.shape)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      model = nnx.merge(gd, p)
      return bb.lm_loss(model.logits(model(inp)), tgt, w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.25 * losses[0], losses


def test_shared_prompt_cache_matches_tiled_cache():
  """Beams reading one shared prompt cache get the hidden states of a tiled full cache."""
  gd, params = split_model()
  _, cached, _, logits = jitted(gd)
  beams, p_len = 3, 6
  prompt = tokens(2, p_len, seed=3)
  mask = jnp.asarray([[True] * p_len, [True] * 4 + [False] * 2])  # row 1 right-padded
  cache = bb.init_cache(tiny(), 2, p_len + 4)
  _, cache = cached(params, prompt, mask, cache)
  tiled = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cache)
  prompt_cache = cache.truncate(p_len)
  own = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), bb.beam_cache(prompt_cache, 4))
  shared_call = jax.jit(lambda p, tok, c, s: bb.apply(gd, p, tok, cache=c, shared=s))
  new = tokens(2 * beams, 4, seed=4)  # each beam its own continuation
  for t, width in [(0, 1), (1, 1), (2, 2)]:  # one-token steps, then a two-token call
    want, tiled = cached(params, new[:, t:t + width], jnp.ones((2 * beams, width), bool), tiled)
    got, own = shared_call(params, new[:, t:t + width], own, prompt_cache)
    close(got, want)
  np.testing.assert_array_equal(own.pos, tiled.pos)
  assert own.k[0].shape[1] == 4 and prompt_cache.k[0].shape[1] == p_len


@pytest.mark.parametrize("tie", [True, False])
def test_token_logits_are_columns_of_logits(tie):
  gd, params = split_model(tie=tie)
  fwd, _, _, logits = jitted(gd)
  hidden = fwd(params, tokens(2, 5), jnp.ones((2, 5), bool))  # [B, T, D]
  ids = jnp.asarray([5, 0, V - 1, 7])
  close(bb.apply(gd, params, hidden, ids, method="token_logits"),
        logits(params, hidden)[..., ids], tol=1e-6)
