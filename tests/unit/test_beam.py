"""Trie tables and constrained beam search: brute force, constraints, recompilation, sharding,
the host reference, and the real decoder backbone."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from sigma_jax import parallel
from sigma_jax.generate import beam, reference, testing, trie
from sigma_jax.models import backbone as bb
from sigma_jax.models import rq
from sigma_jax.numerics import NEG_INF

HASH_MOD = 65521
TABLE_ROWS = 4099
# Number of traces of `hash_step` (a Python side effect runs only when JAX traces).
TRACES = {"hash_step": 0}


def hash_step(table, tokens, cache, step):
  """A tiny deterministic "model": logits looked up by a hash of the whole token prefix.

  The cache carries the running hash [R] (plus an unused [R, 2] leaf, so beam reordering of a
  multi-dimensional leaf is exercised).
  """
  del step
  TRACES["hash_step"] += 1
  h = (cache["h"] * 31 + tokens + 7) % HASH_MOD  # [R]
  return table[h % TABLE_ROWS], {"h": h, "aux": cache["aux"]}


def hash_logits_np(table, h, tok):
  h = (h * 31 + tok + 7) % HASH_MOD
  return h, table[h % TABLE_ROWS].astype(np.float64)


def offsets_for(sizes, base_offset=10):
  return tuple(int(base_offset + x) for x in np.cumsum((0,) + tuple(sizes[:-1])))


def make_case(batch, sizes, seed=0):
  rng = np.random.default_rng(seed)
  offs = offsets_for(sizes)
  vocab = offs[-1] + sizes[-1] + 3
  table = rng.normal(0, 2.0, (TABLE_ROWS, vocab)).astype(np.float32)
  h0 = rng.integers(0, 1000, batch).astype(np.int32)
  start = rng.integers(0, 10, batch).astype(np.int32)
  cache = {"h": h0, "aux": np.arange(batch * 2, dtype=np.float32).reshape(batch, 2)}
  return table, h0, start, cache, offs


def brute_force(table, h0, start, allowed, sizes, offs, k, renormalize=True):
  """Every allowed sequence scored directly; the K best per example."""
  allowed = sorted({tuple(int(c) for c in s) for s in allowed})
  children = {}
  for s in allowed:
    for d in range(len(s)):
      children.setdefault(s[:d], set()).add(s[d])
  out_seqs, out_scores = [], []
  for b in range(len(h0)):
    scored = []
    for s in allowed:
      h, tok, total = int(h0[b]), int(start[b]), 0.0
      for l, code in enumerate(s):
        h, lg = hash_logits_np(table, h, tok)
        lg = lg[offs[l]:offs[l] + sizes[l]]
        z = lg[sorted(children[s[:l]])] if renormalize else lg
        total += lg[code] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
        tok = offs[l] + code
      scored.append((total, s))
    scored.sort(key=lambda x: -x[0])
    out_seqs.append([s for _, s in scored[:k]])
    out_scores.append([x for x, _ in scored[:k]])
  return out_seqs, out_scores


def search(table, start, cache, tables, k, offs, renormalize=True):
  return beam.constrained_beam_search(hash_step, table, start, cache, tables, num_beams=k,
                                      token_offset=offs, renormalize=renormalize)


def random_catalogue(rng, n, sizes):
  return np.stack([rng.integers(0, c, n) for c in sizes], 1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Tables


@pytest.mark.parametrize("sizes", [(5,), (4, 3), (4, 3, 5), (3, 4, 2, 3)])
def test_tables_children_and_leaf_ids(sizes):
  rng = np.random.default_rng(1)
  sids = random_catalogue(rng, 30, sizes)
  t = trie.build_tables(sids, sizes)
  fn = reference.prefix_allowed_fn(sids)
  for d in range(len(sizes)):
    for prefix in itertools.product(*[range(c) for c in sizes[:d]]):
      np.testing.assert_array_equal(trie.allowed_children(t, prefix), fn(prefix))
  _, _, _, prefixes = rq.prefix_buckets(sids, len(sizes))
  # Depth-L node ids are the ranks of the distinct SIDs; leaf_ids maps them to bucket ids.
  ranks = t.leaf_ids[prefixes[:, 0]] if len(sizes) == 1 else t.leaf_ids[:len(prefixes)]
  np.testing.assert_array_equal(ranks, np.arange(len(prefixes)))


def test_subset_tables_keep_shapes_and_global_ids():
  rng = np.random.default_rng(2)
  sizes = (4, 3, 5)
  sids = random_catalogue(rng, 40, sizes)
  full = trie.build_tables(sids, sizes)
  sub = trie.subset_tables(sids, sizes, np.arange(0, 40, 3))
  assert jax.tree.map(np.shape, full) == jax.tree.map(np.shape, sub)
  _, _, _, prefixes = rq.prefix_buckets(sids, 3)
  kept = np.unique(sids[::3], axis=0)
  ids = sub.leaf_ids[sub.leaf_ids >= 0]
  np.testing.assert_array_equal(prefixes[ids], kept)
  with pytest.raises(ValueError, match="capacity"):
    trie.build_tables(sids, sizes, capacity=10)
  with pytest.raises(ValueError, match="outside"):
    trie.build_tables(sids, (4, 2, 5))


# ---------------------------------------------------------------------------------------------
# Beam search against brute force


@pytest.mark.parametrize("sizes,constrained,renormalize", [
    ((4, 4, 4), False, True),
    ((4, 3, 5, 2), True, True),
    ((4, 3, 5, 2), True, False),
    ((6,), True, True),
])
def test_matches_brute_force(sizes, constrained, renormalize):
  batch = 3
  table, h0, start, cache, offs = make_case(batch, sizes, seed=len(sizes))
  everything = np.array(list(itertools.product(*[range(c) for c in sizes])), np.int32)
  if constrained:
    rng = np.random.default_rng(7)
    allowed = everything[rng.random(len(everything)) < 0.4]
  else:
    allowed = everything
  # Beam search is exact when K covers every prefix of every depth < L (nothing is pruned
  # before the last level); pruning itself is checked against the host reference below.
  k = max(len(np.unique(allowed[:, :d], axis=0)) for d in range(len(sizes)))
  k = len(allowed) if len(sizes) == 1 else k
  tables = trie.build_tables(allowed, sizes)
  out = search(table, start, cache, tables, k, offs, renormalize)
  want_seqs, want_scores = brute_force(table, h0, start, allowed, sizes, offs, k, renormalize)
  assert bool(np.all(out.valid))
  for b in range(batch):
    assert [tuple(s) for s in np.asarray(out.sequences[b]).tolist()] == want_seqs[b]
  np.testing.assert_allclose(out.scores, np.array(want_scores), rtol=1e-5, atol=1e-5)
  # Cache rows follow their beams: the hash of beam k is that of its own prefix.
  for b in range(batch):
    for kk, s in enumerate(want_seqs[b]):
      h, tok = int(h0[b]), int(start[b])
      for l, code in enumerate(s[:-1]):
        h, _ = hash_logits_np(table, h, tok)
        tok = offs[l] + code
      h, _ = hash_logits_np(table, h, tok)
      assert int(out.cache["h"][b * k + kk]) == h
      assert int(out.last_tokens[b, kk]) == offs[-1] + s[-1]


# Most tests share one shape (sizes, batch, K, capacity), so they share one compiled search.
SIZES, BATCH, K, CAP = (4, 3, 5, 2), 4, 5, 40


def test_fewer_valid_than_k_marks_extra_beams_invalid():
  sizes = SIZES
  table, h0, start, cache, offs = make_case(BATCH, sizes)
  allowed = np.array([[0, 1, 2, 1], [0, 1, 4, 0], [3, 2, 0, 0]], np.int32)
  out = search(table, start, cache, trie.build_tables(allowed, sizes, capacity=CAP), K, offs)
  np.testing.assert_array_equal(out.valid, [[True] * 3 + [False] * 2] * BATCH)
  assert np.all(np.asarray(out.scores)[:, 3:] == NEG_INF)
  assert np.all(np.isfinite(out.scores))
  assert np.all(np.asarray(out.sequences)[:, 3:] == -1)
  assert np.all(np.asarray(out.prefix_ids)[:, 3:] == -1)
  for b in range(BATCH):
    got = {tuple(s) for s in np.asarray(out.sequences[b, :3]).tolist()}
    assert got == {tuple(s) for s in allowed.tolist()}
    assert sorted(np.asarray(out.prefix_ids[b, :3]).tolist()) == [0, 1, 2]
  # The three valid beams are the brute-force ranking of the three sequences.
  _, want = brute_force(table, h0, start, allowed, sizes, offs, K)
  np.testing.assert_allclose(np.asarray(out.scores)[:, :3], np.array(want), rtol=1e-5, atol=1e-5)


def test_random_catalogues_stay_inside_allowed_set_and_do_not_recompile():
  sizes, n, k, batch = SIZES, CAP, K, BATCH
  table, _, start, cache, offs = make_case(batch, sizes, seed=3)
  traces = None
  for seed in range(5):
    rng = np.random.default_rng(100 + seed)
    sids = random_catalogue(rng, n, sizes)
    _, _, _, prefixes = rq.prefix_buckets(sids, len(sizes))
    category = rng.random(n) < 0.3
    for items, allowed in [(None, sids), (category, sids[category])]:
      tables = trie.build_tables(sids, sizes, items=items, capacity=n)
      out = search(table, start, cache, tables, k, offs)
      allowed_set = {tuple(s) for s in allowed.tolist()}
      want_valid = min(k, len(allowed_set))
      assert np.all(np.asarray(out.valid).sum(1) == want_valid)
      for b in range(batch):
        got = [tuple(s) for s, v in zip(np.asarray(out.sequences[b]).tolist(),
                                         np.asarray(out.valid[b])) if v]
        assert set(got) <= allowed_set and len(set(got)) == len(got)
        ids = np.asarray(out.prefix_ids[b])[:len(got)]
        np.testing.assert_array_equal(prefixes[ids], np.array(got))
      if traces is None:
        traces = TRACES["hash_step"]
  # Ten catalogues and category subsets of one capacity: traced once, on the first call.
  assert TRACES["hash_step"] == traces


def test_new_tables_of_same_shape_do_not_recompile():
  sizes = SIZES
  table, _, start, cache, offs = make_case(BATCH, sizes, seed=11)
  rng = np.random.default_rng(5)
  t1 = trie.build_tables(random_catalogue(rng, 20, sizes), sizes, capacity=CAP)
  t2 = trie.build_tables(random_catalogue(rng, 35, sizes), sizes, capacity=CAP)
  search(table, start, cache, t1, K, offs)
  before = TRACES["hash_step"]
  size_before = beam.constrained_beam_search._cache_size()
  out2 = search(table, start, cache, t2, K, offs)
  search(table * 2, start, cache, t1, K, offs)  # new parameters, same shapes
  assert TRACES["hash_step"] == before
  assert beam.constrained_beam_search._cache_size() == size_before
  allowed2 = set(map(tuple, trie_rows(t2, sizes)))
  got = np.asarray(out2.sequences)[np.asarray(out2.valid)]
  assert {tuple(s) for s in got.tolist()} <= allowed2


def trie_rows(tables, sizes):
  """Every SID the tables allow, by walking them on the host."""
  rows = [()]
  for _ in sizes:
    rows = [r + (c,) for r in rows for c in trie.allowed_children(tables, r)]
  return rows


def test_batched_tables_constrain_each_row():
  sizes, n = SIZES, CAP
  table, _, start, cache, offs = make_case(BATCH, sizes, seed=4)
  rng = np.random.default_rng(9)
  sids = random_catalogue(rng, n, sizes)
  cats = [np.flatnonzero(sids[:, 0] == c) for c in (0, 1, 2, 3)]
  per_row = trie.stack_tables([trie.subset_tables(sids, sizes, c) for c in cats])
  out = search(table, start, cache, per_row, K, offs)
  for b, c in enumerate(cats):
    allowed = {tuple(s) for s in sids[c].tolist()}
    got = [tuple(s) for s, v in zip(np.asarray(out.sequences[b]).tolist(),
                                     np.asarray(out.valid[b])) if v]
    assert got and set(got) <= allowed
    # Row b equals a search of the whole batch against row b's (unbatched) tables.
    one = search(table, start, cache, trie.subset_tables(sids, sizes, c), K, offs)
    np.testing.assert_array_equal(out.sequences[b], one.sequences[b])
    np.testing.assert_allclose(out.scores[b], one.scores[b], rtol=1e-6)


def test_sharded_batch_matches_one_device():
  sizes, n, batch, k = SIZES, CAP, 8, K
  table, _, start, cache, offs = make_case(batch, sizes, seed=6)
  sids = random_catalogue(np.random.default_rng(12), n, sizes)
  tables = trie.build_tables(sids, sizes)
  one = search(table, start, cache, tables, k, offs)
  mesh = parallel.make_mesh(dict(data=8, fsdp=1, model=1))
  rows = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  sharded = search(jax.device_put(table, rep), jax.device_put(start, rows),
                   jax.device_put(cache, rows), jax.device_put(tables, rep), k, offs)
  assert len(sharded.sequences.devices()) == 8
  np.testing.assert_array_equal(sharded.sequences, one.sequences)
  np.testing.assert_array_equal(sharded.valid, one.valid)
  np.testing.assert_allclose(sharded.scores, one.scores, rtol=1e-6)


def test_host_reference_matches_jitted_search():
  sizes, n, batch, k = SIZES, CAP, BATCH, K
  table, _, start, cache, offs = make_case(batch, sizes, seed=8)
  sids = random_catalogue(np.random.default_rng(13), 30, sizes)
  out = search(table, start, cache, trie.build_tables(sids, sizes, capacity=n), k, offs)
  seqs, scores, valid = reference.host_beam_search(
      hash_step, table, start, cache, reference.prefix_allowed_fn(sids), num_beams=k,
      token_offset=offs, codebook_sizes=sizes)
  np.testing.assert_array_equal(valid, out.valid)
  np.testing.assert_array_equal(seqs, out.sequences)
  np.testing.assert_allclose(scores[valid], np.asarray(out.scores)[valid], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The real backbone


@pytest.mark.slow
def test_decoder_integration_prefill_search_and_q_pass():
  cfg = base.backbone("tiny")
  cfg.vocab_size = 64
  sizes, q_token, k = (4, 3, 5), 5, 4
  offs = offsets_for(sizes, base_offset=40)  # SID tokens 40..51
  # NumPy-filled parameters: Flax's initialisers compile one slow random op per shape on CPU.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: bb.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(0, 0.3, x.shape).astype(np.float32)), abstract)
  sids = random_catalogue(rng, 25, sizes)
  tables = trie.build_tables(sids, sizes)
  prompt = rng.integers(6, 40, (2, 7)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  mask[1, :2] = False  # left padding in row 1

  @jax.jit
  def prefill(params, tokens, mask):
    cache = bb.init_cache(cfg, tokens.shape[0], max_len=16)
    _, cache = bb.apply(graphdef, params, tokens, attn_mask=mask, cache=cache)
    return cache

  cache = prefill(params, prompt[:, :-1], mask[:, :-1])
  step = testing.DecoderStep(graphdef)
  out = beam.constrained_beam_search(step, params, prompt[:, -1], cache, tables, num_beams=k,
                                     token_offset=offs)
  allowed = {tuple(s) for s in sids.tolist()}
  assert np.all(out.valid)
  fn = reference.prefix_allowed_fn(sids)

  @jax.jit
  def full_forward(params, tokens, mask):
    hidden = bb.apply(graphdef, params, tokens, attn_mask=mask)
    return hidden, bb.apply(graphdef, params, hidden, method="logits")

  # <q> pass on the returned cache: feed [last code, <q>] and read the hidden state at <q>.
  @jax.jit
  def q_pass(params, cache, last_tokens):
    toks = jnp.stack([last_tokens, jnp.full_like(last_tokens, q_token)], axis=1)  # [B*K, 2]
    hidden, _ = bb.apply(graphdef, params, toks, cache=cache)
    return hidden[:, 1]

  h_q = np.asarray(q_pass(params, out.cache, out.last_tokens.reshape(-1)))
  for b in range(2):
    for kk in range(k):
      seq = tuple(int(c) for c in out.sequences[b, kk])
      assert seq in allowed
      codes_tok = [offs[l] + c for l, c in enumerate(seq)]
      toks = np.concatenate([prompt[b], codes_tok, [q_token]])[None].astype(np.int32)
      m = np.concatenate([mask[b], np.ones(len(sizes) + 1, bool)])[None]
      hidden, logits = full_forward(params, toks, m)
      # The beam score is the constrained log-prob of the sequence under the full forward.
      total = 0.0
      for l in range(len(sizes)):
        row = np.asarray(logits[0, prompt.shape[1] - 1 + l, offs[l]:offs[l] + sizes[l]],
                         np.float64)
        ok = fn(seq[:l])
        z = row[ok]
        total += row[seq[l]] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
      np.testing.assert_allclose(out.scores[b, kk], total, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(h_q[b * k + kk], hidden[0, -1], rtol=1e-4, atol=1e-4)
  # The host reference decodes the same beams with the same step function.
  seqs, _, valid = reference.host_beam_search(step, params, prompt[:, -1], cache, fn,
                                              num_beams=k, token_offset=offs,
                                              codebook_sizes=sizes)
  np.testing.assert_array_equal(seqs, out.sequences)
  # Level-code logits only (what `generator.generate` runs): the same beams; the scores differ
  # at most by the rounding of a narrower output product.
  level_step = testing.DecoderStep(graphdef, token_offset=offs, width=max(sizes))
  lv = beam.constrained_beam_search(level_step, params, prompt[:, -1], cache, tables,
                                    num_beams=k, token_offset=offs, level_logits=True)
  np.testing.assert_array_equal(lv.sequences, out.sequences)
  np.testing.assert_array_equal(lv.valid, out.valid)
  np.testing.assert_allclose(lv.scores, out.scores, rtol=1e-6, atol=1e-6)
  seqs, _, valid = reference.host_beam_search(level_step, params, prompt[:, -1], cache, fn,
                                              num_beams=k, token_offset=offs,
                                              codebook_sizes=sizes, level_logits=True)
  np.testing.assert_array_equal(seqs, out.sequences)
  # The beams sharing one prompt cache (as `generator.generate`): the same beams, and the <q>
  # pass on the beams' own caches gives the full forward's hidden state.
  shared_step = testing.DecoderStep(graphdef, token_offset=offs, width=max(sizes), shared=True)
  prompt_cache = jax.jit(lambda c: c.truncate(prompt.shape[1] - 1))(cache)
  own = bb.beam_cache(prompt_cache, len(sizes) + 2)
  sh = beam.constrained_beam_search(shared_step, (params, prompt_cache), prompt[:, -1], own,
                                    tables, num_beams=k, token_offset=offs, level_logits=True)
  np.testing.assert_array_equal(sh.sequences, out.sequences)
  np.testing.assert_allclose(sh.scores, out.scores, rtol=1e-6, atol=1e-6)

  @jax.jit
  def shared_q_pass(params, prompt_cache, cache, last_tokens):
    toks = jnp.stack([last_tokens, jnp.full_like(last_tokens, q_token)], axis=1)  # [B*K, 2]
    hidden, _ = bb.apply(graphdef, params, toks, cache=cache, shared=prompt_cache)
    return hidden[:, 1]

  np.testing.assert_allclose(
      shared_q_pass(params, prompt_cache, sh.cache, sh.last_tokens.reshape(-1)), h_q,
      rtol=1e-5, atol=1e-5)
  seqs, _, _ = reference.host_beam_search(shared_step, (params, prompt_cache), prompt[:, -1],
                                          own, fn, num_beams=k, token_offset=offs,
                                          codebook_sizes=sizes, level_logits=True)
  np.testing.assert_array_equal(seqs, out.sequences)
