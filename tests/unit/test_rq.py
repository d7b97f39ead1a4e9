"""Tests of the residual quantisers, SID de-duplication, prefix buckets and report."""
import json

import ml_collections
import numpy as np
import pytest

from sigma_jax.models import rq

N, D, C, L = 512, 16, 16, 3
RQVAE_KW = dict(hidden_dims=(32,), latent_dim=8, epochs=8, batch_size=128, learning_rate=3e-3,
                beta=0.25)


@pytest.fixture(scope="module")
def x():
  """[N, D] points around 32 well-separated centres."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(32, D)).astype(np.float32)
  return (centres[rng.integers(0, 32, N)] + 0.3 * rng.normal(size=(N, D))).astype(np.float32)


def tok_cfg(kind):
  cfg = ml_collections.ConfigDict(dict(kind=kind, levels=L, codebook_size=C, prefix_len=1,
                                       dedup=True, kmeans_iters=20))
  cfg.rqvae = ml_collections.ConfigDict(RQVAE_KW)
  return cfg


@pytest.fixture(scope="module")
def rqvae_out(x):
  return rq.tokenize_items(x, tok_cfg("rqvae"), seed=0)


def assert_strictly_decreasing(norms):
  assert all(b < a for a, b in zip(norms[:-1], norms[1:])), norms


def test_rqkmeans_residuals_shrink_and_codes_are_used(x):
  codes, codebooks = rq.rq_kmeans(x, L, C, iters=20, seed=0)
  assert codes.shape == (N, L) and codes.dtype == np.int32
  assert len(codebooks) == L and all(cb.shape == (C, D) for cb in codebooks)
  assert codes.min() >= 0 and codes.max() < C
  assert_strictly_decreasing(rq.residual_norms(x, codes, codebooks))
  assert len(np.unique(codes[:, 0])) / C >= 0.9


def test_rqkmeans_random_init_and_determinism(x):
  a, _ = rq.rq_kmeans(x, L, C, iters=20, seed=3, init="random")
  b, _ = rq.rq_kmeans(x, L, C, iters=20, seed=3, init="random")
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a[:, 0])) / C >= 0.9


def test_fewer_items_than_codes_is_an_error(x):
  with pytest.raises(ValueError, match="N >= C"):
    rq.rq_kmeans(x[:10], L, C, iters=5)
  with pytest.raises(ValueError, match="N >= C"):
    rq.train_rqvae(x[:10], levels=L, codebook_size=C, **RQVAE_KW)


def test_rqvae_trains_and_residuals_shrink(rqvae_out):
  info = rqvae_out["train_info"]
  assert rqvae_out["codes"].shape == (N, L)
  assert info["loss"][-1] < info["loss"][0]
  assert_strictly_decreasing(info["residual_norms"])
  assert info["final_usage"][0] >= 0.9
  json.dumps(info)


def test_rqvae_is_deterministic(x, rqvae_out):
  codes, info = rq.train_rqvae(x, levels=L, codebook_size=C, seed=0, kmeans_iters=20,
                               **RQVAE_KW)
  np.testing.assert_array_equal(codes, rqvae_out["codes"])
  assert info["loss"] == rqvae_out["train_info"]["loss"]


def test_reset_dead_codes_replaces_provably_unused_codes(x):
  live = rq.rq_kmeans(x, 1, 4, iters=10, seed=0)[1][0]  # [4, D]
  # Four codes 1e3 away from every point can never be the nearest code.
  codebook = np.concatenate([live, np.full((4, D), 1e3, np.float32)])  # [8, D]

  def nearest(cb):
    return np.argmin(((x[:, None] - cb[None]) ** 2).sum(-1), 1)  # [N]

  counts = np.bincount(nearest(codebook), minlength=8)
  assert (counts[4:] == 0).all()
  new, num_reset = rq.reset_dead_codes(codebook, counts, x, np.random.default_rng(0))
  assert num_reset == 4
  np.testing.assert_array_equal(new[:4], codebook[:4])
  assert len(np.unique(nearest(new))) > len(np.unique(nearest(codebook)))


def test_rqvae_resets_dead_codes_and_usage_rises(x):
  # Codebooks drawn with std 10 around latents of norm ~1: most codes are never nearest.
  _, info = rq.train_rqvae(x, levels=L, codebook_size=C, seed=0, codebook_init="random",
                           init_scale=10.0, **RQVAE_KW)
  assert info["initial_usage"][0] < 0.5
  assert info["dead_codes_reset_total"] > 0
  assert sum(info["dead_codes_reset"][0]) > 0
  assert info["final_usage"][0] > info["initial_usage"][0]
  assert info["final_usage"][0] >= 0.9


def test_deduplicate_and_collision_rate_by_hand():
  codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]], np.int32)
  sids = rq.deduplicate(codes)
  np.testing.assert_array_equal(sids[:, :2], codes)
  np.testing.assert_array_equal(sids[:, 2], [0, 1, 0, 2, 1, 0])
  assert rq.collision_rate(codes) == pytest.approx(5 / 6)
  assert rq.collision_rate(sids) == 0.0


def test_deduplicate_on_real_codes(x):
  codes, _ = rq.rq_kmeans(x, 2, 4, iters=10, seed=0)  # 16 cells for 512 items: many collisions
  sids = rq.deduplicate(codes)
  assert sids.shape == (N, 3)
  np.testing.assert_array_equal(sids[:, :2], codes)
  assert len(np.unique(sids, axis=0)) == N
  assert rq.collision_rate(codes) > 0.5 and rq.collision_rate(sids) == 0.0


@pytest.mark.parametrize("prefix_len", [0, 1, 2])
def test_prefix_buckets_hold_every_item_once(x, prefix_len):
  codes, _ = rq.rq_kmeans(x, 2, 4, iters=10, seed=0)
  prefix_ids, table, sizes, prefixes = rq.prefix_buckets(codes, prefix_len)
  assert prefixes.shape == (len(sizes), prefix_len) and table.shape[0] == len(sizes)
  items = table[table >= 0]
  np.testing.assert_array_equal(np.sort(items), np.arange(N))  # each item exactly once
  np.testing.assert_array_equal((table >= 0).sum(1), sizes)
  rows = np.argwhere(table >= 0)
  np.testing.assert_array_equal(prefix_ids[table[rows[:, 0], rows[:, 1]]], rows[:, 0])
  np.testing.assert_array_equal(prefixes[prefix_ids], codes[:, :prefix_len])
  assert len(np.unique(prefixes, axis=0)) == len(prefixes)
  for row in table:  # items in item order, padding at the end
    real = row[row >= 0]
    assert (np.diff(real) > 0).all() and (row[len(real):] == -1).all()


def test_prefix_buckets_rejects_bad_length():
  with pytest.raises(ValueError):
    rq.prefix_buckets(np.zeros((3, 2), np.int32), 3)


def test_tokenizer_report_by_hand():
  codes = np.array([[0, 1], [0, 1], [2, 3], [1, 1]], np.int32)
  sids = rq.deduplicate(codes)
  _, _, sizes, _ = rq.prefix_buckets(sids, 1)
  report = rq.tokenizer_report(codes, sids, sizes, codebook_size=4)
  json.dumps(report)
  assert report["usage_per_level"] == [0.75, 0.5]
  assert report["collision_rate_before"] == 0.5
  assert report["collision_rate_after"] == 0.0
  assert report["dedup_level_size"] == 2 and report["max_items_per_code"] == 2
  assert report["bucket_size_max"] == 2 and report["bucket_size_mean"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("kind", ["rqkmeans", "rqvae"])
def test_tokenize_items(x, rqvae_out, kind):
  out = rqvae_out if kind == "rqvae" else rq.tokenize_items(x, tok_cfg(kind), seed=0)
  report = out["report"]
  json.dumps(report)
  assert report["kind"] == kind
  assert out["sids"].shape == (N, L + 1)
  assert report["collision_rate_after"] == 0.0
  assert report["num_prefixes"] == len(out["bucket_sizes"]) == len(out["prefixes"])
  assert report["bucket_size_max"] == out["bucket_table"].shape[1]
  assert_strictly_decreasing(report["residual_norms"])
  again = rq.tokenize_items(x, tok_cfg(kind), seed=0) if kind == "rqkmeans" else out
  np.testing.assert_array_equal(again["sids"], out["sids"])


def test_tokenize_items_unknown_kind(x):
  with pytest.raises(ValueError, match="unknown tokenizer kind"):
    rq.tokenize_items(x, tok_cfg("vqgan"), seed=0)
