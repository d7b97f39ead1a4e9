"""Bucketed retrieval, adaptive probabilistic fusion (APF) and the un-fused ablation ranking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_jax.generate import fusion
from sigma_jax.models import rq
from sigma_jax.numerics import NEG_INF


def beam_outputs(rng, batch, k, m, invalid_rows=()):
  """Random beam scores (sorted log-probs), validity, and disjoint candidate items per beam."""
  probs = rng.dirichlet(np.ones(k * 2), batch)[:, :k]  # [B, K], sums below 1 like real beams
  scores = np.sort(np.log(probs), axis=1)[:, ::-1].astype(np.float32)
  valid = np.ones((batch, k), bool)
  for b, n in invalid_rows:
    valid[b, n:] = False
    scores[b, n:] = NEG_INF
  items = rng.permutation(batch * k * m * 2)[:batch * k * m].reshape(batch, k, m)
  items[rng.random(items.shape) < 0.25] = -1  # short buckets
  cos = rng.uniform(-1, 1, (batch, k, m)).astype(np.float32)
  cos[items < 0] = NEG_INF
  return scores, valid, items.astype(np.int32), cos


def test_apf_matches_numpy_reference():
  rng = np.random.default_rng(0)
  scores, valid, items, cos = beam_outputs(rng, 4, 5, 4, invalid_rows=[(1, 3), (2, 1)])
  for tau, top_n in [(0.1, 12), (1.0, 30)]:  # 30 > K*M: padded output
    got = fusion.apf_rank(scores, valid, items, cos, tau, top_n)
    want_items, want_p = fusion.apf_reference(scores, valid, items, cos, tau, top_n)
    np.testing.assert_array_equal(got.items, want_items)
    np.testing.assert_allclose(got.scores, want_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.valid, want_items >= 0)
    # The beam index points at the bucket each item came from.
    for b, n in zip(*np.nonzero(np.asarray(got.valid))):
      assert int(got.items[b, n]) in items[b, int(got.beam[b, n])]
  # Over all candidates the fused probabilities sum to one.
  full = fusion.apf_rank(scores, valid, items, cos, 0.1, 20)
  np.testing.assert_allclose(np.asarray(full.scores).sum(1), 1.0, rtol=1e-5)


def test_fixed_sigma_matches_numpy_reference():
  """generation.apf_fixed_sigma: the same σ for every query, instead of std(φ)."""
  rng = np.random.default_rng(3)
  scores, valid, items, cos = beam_outputs(rng, 4, 5, 4, invalid_rows=[(1, 3), (2, 1)])
  tau, top_n, fixed = 0.1, 30, 0.05
  got = fusion.apf_rank(scores, valid, items, cos, tau, top_n, fixed_sigma=fixed)
  want_items, want_p = fusion.apf_reference(scores, valid, items, cos, tau, top_n,
                                            fixed_sigma=fixed)
  np.testing.assert_array_equal(got.items, want_items)
  np.testing.assert_allclose(got.scores, want_p, rtol=1e-5, atol=1e-7)
  # Written out: P(v_i | T) = φ_k / Σ φ · softmax_{bucket k}(cos · σ / τ), σ the constant.
  for b in range(len(items)):
    phi = np.where(valid[b], np.exp(scores[b].astype(np.float64)), 0.0)
    for n in np.flatnonzero(np.asarray(got.valid[b])):
      k = int(got.beam[b, n])
      members = items[b, k] >= 0
      z = cos[b, k][members].astype(np.float64) * fixed / tau
      m = list(items[b, k][members]).index(int(got.items[b, n]))
      p = phi[k] / phi.sum() * np.exp(z[m] - z.max()) / np.exp(z - z.max()).sum()
      np.testing.assert_allclose(float(got.scores[b, n]), p, rtol=1e-5)
  # The queries' adaptive σ differ from the constant, and so does the adaptive fusion.
  _, adaptive_sigma, _ = fusion.apf_terms(jnp.asarray(scores), jnp.asarray(valid),
                                          jnp.asarray(cos), jnp.asarray(items), tau)
  _, fixed_sigma, _ = fusion.apf_terms(jnp.asarray(scores), jnp.asarray(valid),
                                       jnp.asarray(cos), jnp.asarray(items), tau, fixed)
  np.testing.assert_allclose(fixed_sigma, fixed)
  assert np.all(np.abs(np.asarray(adaptive_sigma) - fixed) > 1e-3)
  adaptive = fusion.apf_rank(scores, valid, items, cos, tau, top_n)
  assert not np.allclose(np.asarray(adaptive.scores), np.asarray(got.scores))
  # A constant equal to a query's own adaptive σ gives that query's adaptive fusion; 0 (the
  # default) is the adaptive σ itself.
  for b in (0, 3):
    one = fusion.apf_rank(scores[b:b + 1], valid[b:b + 1], items[b:b + 1], cos[b:b + 1], tau,
                          top_n, fixed_sigma=float(adaptive_sigma[b]))
    np.testing.assert_allclose(one.scores[0], adaptive.scores[b], rtol=1e-5, atol=1e-7)
  off = fusion.apf_rank(scores, valid, items, cos, tau, top_n, fixed_sigma=0.0)
  np.testing.assert_array_equal(off.items, adaptive.items)


def test_large_sigma_sharpens_the_item_distribution():
  k, m = 5, 6
  cos = np.tile(np.linspace(-0.5, 0.9, m, dtype=np.float32), (2, k, 1))  # [2, K, M]
  items = np.arange(2 * k * m, dtype=np.int32).reshape(2, k, m)
  peaked = np.log([0.9, 0.04, 0.03, 0.02, 0.01])
  flat = np.log([0.2, 0.2, 0.2, 0.2, 0.19])
  scores = np.stack([peaked, flat]).astype(np.float32)
  valid = np.ones((2, k), bool)
  terms = jax.jit(fusion.apf_terms)
  _, sigma, log_item = terms(jnp.asarray(scores), jnp.asarray(valid),
                                        jnp.asarray(cos), jnp.asarray(items), 0.07)
  np.testing.assert_allclose(sigma, [np.std(np.exp(peaked)), np.std(np.exp(flat))], rtol=1e-5)
  assert sigma[0] > 10 * sigma[1]
  p = np.exp(np.asarray(log_item[:, 0]))  # bucket of beam 0, [2, M]
  entropy = -(p * np.log(p)).sum(1)
  assert entropy[0] < entropy[1] and p[0].max() > p[1].max()
  # Equal beam probabilities: σ = 0 and a uniform item distribution.
  _, sigma0, log_item0 = terms(jnp.zeros((1, k)), jnp.asarray(valid[:1]), jnp.asarray(cos[:1]),
                               jnp.asarray(items[:1]), 0.07)
  assert float(sigma0[0]) == 0.0
  np.testing.assert_allclose(np.exp(log_item0), 1.0 / m, rtol=1e-6)


def test_unfused_rank_sorts_by_prefix_then_cosine():
  rng = np.random.default_rng(1)
  scores, valid, items, cos = beam_outputs(rng, 3, 4, 5, invalid_rows=[(2, 2)])
  scores = scores[:, ::-1].copy()  # beams in any order: the sort must use the scores
  valid = valid[:, ::-1].copy()
  items, cos = items[:, ::-1].copy(), cos[:, ::-1].copy()
  got = fusion.unfused_rank(scores, valid, items, cos, 15)
  for b in range(3):
    cands = [(-scores[b, k], -cos[b, k, m], items[b, k, m]) for k in range(4) for m in range(5)
             if valid[b, k] and items[b, k, m] >= 0]
    want = [c[2] for c in sorted(cands)][:15]
    np.testing.assert_array_equal(np.asarray(got.items[b])[:len(want)], want)
    assert np.all(np.asarray(got.items[b])[len(want):] == -1)


@pytest.mark.parametrize("num_items,normalize", [(3, True), (40, True), (40, False)])
def test_bucket_retrieval_matches_brute_force(num_items, normalize):
  """40 > the largest bucket: padded. normalize=False scores by dot product (sft.similarity)."""
  rng = np.random.default_rng(2)
  n, d, batch, k = 60, 8, 3, 4
  codes = rng.integers(0, 6, (n, 2))
  prefix_ids, table, sizes, _ = rq.prefix_buckets(codes, 1)
  emb = rng.normal(size=(n, d)).astype(np.float32)
  h = rng.normal(size=(batch, k, d)).astype(np.float32)
  pids = rng.integers(0, len(sizes), (batch, k)).astype(np.int32)
  pids[1, 3] = -1  # an invalid beam
  emb *= rng.uniform(0.2, 3.0, (n, 1)).astype(np.float32)  # norms that dot products see
  items, cos = fusion.bucket_retrieval(h, pids, table, emb, num_items, normalize=normalize)
  en = emb / np.linalg.norm(emb, axis=1, keepdims=True) if normalize else emb
  for b in range(batch):
    for kk in range(k):
      if pids[b, kk] < 0:
        assert np.all(np.asarray(items[b, kk]) == -1)
        assert np.all(np.asarray(cos[b, kk]) == NEG_INF)
        continue
      members = np.flatnonzero(prefix_ids == pids[b, kk])
      q = h[b, kk] / np.linalg.norm(h[b, kk]) if normalize else h[b, kk]
      c = en[members] @ q
      order = np.argsort(-c, kind="stable")[:num_items]
      got = np.asarray(items[b, kk])
      np.testing.assert_array_equal(got[:len(order)], members[order])
      np.testing.assert_allclose(np.asarray(cos[b, kk])[:len(order)], c[order], rtol=1e-5,
                                 atol=1e-6)
      assert np.all(got[len(order):] == -1)


def test_retrieval_then_fusion_has_no_duplicates():
  rng = np.random.default_rng(3)
  n, d, batch, k, m = 80, 8, 2, 5, 6
  prefix_ids, table, sizes, _ = rq.prefix_buckets(rng.integers(0, 10, (n, 1)), 1)
  emb = rng.normal(size=(n, d)).astype(np.float32)
  h = rng.normal(size=(batch, k, d)).astype(np.float32)
  pids = np.stack([rng.permutation(len(sizes))[:k] for _ in range(batch)]).astype(np.int32)
  scores = np.sort(np.log(rng.dirichlet(np.ones(k), batch)), 1)[:, ::-1].astype(np.float32)
  items, cos = fusion.bucket_retrieval(h, pids, table, emb, m)
  for ranked in (fusion.apf_rank(scores, np.ones((batch, k), bool), items, cos, 0.1, 20),
                 fusion.unfused_rank(scores, np.ones((batch, k), bool), items, cos, 20)):
    for b in range(batch):
      got = np.asarray(ranked.items[b])[np.asarray(ranked.valid[b])]
      assert len(got) == len(set(got.tolist()))
      assert set(prefix_ids[got].tolist()) <= set(pids[b].tolist())


def test_bucket_retrieval_masks_disallowed_items_before_top_m():
  # One bucket of 6 items, M = 2; only items 4 and 5 (the two with the lowest cosine) are
  # allowed. Masking after the top M would return nothing; masking before returns both.
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 4)).astype(np.float32)
  h = emb[0][None, None, :]  # [1, 1, D]: item 0 is the best match
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (h[0, 0] / np.linalg.norm(h))
  order = np.argsort(-cos)
  allowed = np.zeros((1, 6), bool)
  allowed[0, order[-2:]] = True
  items, c = fusion.bucket_retrieval(jnp.asarray(h), jnp.zeros((1, 1), jnp.int32),
                                     jnp.arange(6, dtype=jnp.int32)[None], jnp.asarray(emb), 2,
                                     jnp.asarray(allowed))
  assert sorted(np.asarray(items)[0, 0].tolist()) == sorted(order[-2:].tolist())
  np.testing.assert_allclose(np.asarray(c)[0, 0], np.sort(cos[order[-2:]])[::-1], rtol=1e-5)


def test_item_prior_adds_log_popularity_to_the_retrieval_score():
  """generation.item_prior = λ: an item's score is cos + λ·log(1 + n_i) for the top M (and
  hence APF); λ = 0 is exactly the plain retrieval."""
  from sigma_jax.generate import generator as gen_lib

  rng = np.random.default_rng(4)
  n, d, m = 30, 6, 5
  prefix_ids, table, sizes, _ = rq.prefix_buckets(rng.integers(0, 3, (n, 1)), 1)
  emb = rng.normal(size=(n, d)).astype(np.float32)
  h = rng.normal(size=(1, 2, d)).astype(np.float32)
  pids = np.array([[0, 2]], np.int32)
  counts = rng.integers(0, 500, n)
  bias = gen_lib.item_prior_bias(0.05, counts, n)
  np.testing.assert_allclose(bias, 0.05 * np.log1p(counts), rtol=1e-6)
  items, score = fusion.bucket_retrieval(h, pids, table, emb, m, item_bias=jnp.asarray(bias))
  en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  for kk in range(2):
    members = np.flatnonzero(prefix_ids == pids[0, kk])
    s = en[members] @ (h[0, kk] / np.linalg.norm(h[0, kk])) + bias[members]
    order = np.argsort(-s, kind="stable")[:m]
    np.testing.assert_array_equal(np.asarray(items[0, kk]), members[order])
    np.testing.assert_allclose(np.asarray(score[0, kk]), s[order], rtol=1e-5, atol=1e-6)
  plain = fusion.bucket_retrieval(h, pids, table, emb, m)
  zero = fusion.bucket_retrieval(h, pids, table, emb, m,
                                 item_bias=jnp.asarray(gen_lib.item_prior_bias(0.0, None, n)))
  for a, b in zip(plain, zero):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="item_prior=0.1 needs one training count per item"):
    gen_lib.item_prior_bias(0.1, None, n)
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    gen_lib.item_prior_bias(0.1, np.ones(3), n)
