"""Known-answer tests for sigma_jax.eval.metrics on small hand-made lists."""
import math

import numpy as np
import pytest

from sigma_jax.eval import metrics as M


def test_ranks_hr_ndcg_by_hand():
  ranked = np.array([
      [7, 8, 9, 3, 4],  # target 3 at rank 3 (0-based): ndcg = 1/log2(5)
      [5, 1, 2, 6, 0],  # target 5 at rank 0: ndcg = 1
      [0, 1, 2, 4, 6],  # target 9 absent
      [2, 9, 1, 3, 0],  # target 1 at rank 2: ndcg = 1/log2(4) = 0.5
  ])
  target = np.array([3, 5, 9, 1])
  np.testing.assert_array_equal(M.target_rank(ranked, target), [3, 0, -1, 2])
  assert M.hit_rate_at_k(ranked, target, 1) == 0.25
  assert M.hit_rate_at_k(ranked, target, 3) == 0.5
  assert M.hit_rate_at_k(ranked, target, 5) == 0.75
  assert M.ndcg_at_k(ranked, target, 1) == pytest.approx(0.25)
  assert M.ndcg_at_k(ranked, target, 3) == pytest.approx((1 + 0.5) / 4)
  assert M.ndcg_at_k(ranked, target, 5) == pytest.approx((1 / math.log2(5) + 1 + 0.5) / 4)

  out = M.ranking_metrics(ranked, target, ks=(1, 3, 5))
  assert out["recall@3"] == out["hr@3"] == 0.5
  assert out["ndcg@5"] == pytest.approx((1 / math.log2(5) + 1 + 0.5) / 4)
  assert out["invalid@5"] == 0.0
  with pytest.raises(ValueError):
    M.ranking_metrics(ranked, target, ks=(10,))


def test_padding_and_repeats_are_invalid_never_hits():
  # A PAD target must not match PAD entries; a repeated item counts once, at its first rank.
  ranked = np.array([[-1, -1, 4, 4],
                     [-1, 2, 3, 7]])
  target = np.array([-1, 7])
  np.testing.assert_array_equal(M.valid_mask(ranked),
                                [[False, False, True, False], [False, True, True, True]])
  np.testing.assert_array_equal(M.target_rank(ranked, target), [-1, 3])
  out = M.ranking_metrics(ranked, target, ks=(4,), num_items=5)
  assert out["hr@4"] == 0.5
  assert out["ndcg@4"] == pytest.approx(0.5 / math.log2(5))
  # Invalid: 2 pads + 1 repeat in row 0; 1 pad + item 7 >= num_items in row 1.
  assert out["invalid@4"] == pytest.approx(5 / 8)


def test_category_coverage():
  item_cat = np.array([0, 0, 1, 2, -1])  # item 4 has no category
  ranked = np.array([[0, 1, 4],   # {0}: 1/4
                     [0, 2, 3],   # {0, 1, 2}: 3/4
                     [-1, 2, 2]])  # {1}: 1/4 (pad and repeat add nothing)
  assert M.category_coverage(ranked, item_cat, 4) == pytest.approx((1 + 3 + 1) / 12)
  multi = np.zeros((5, 4), dtype=bool)
  multi[0, [0, 3]] = multi[2, 1] = True
  assert M.category_coverage(np.array([[0, 2]]), multi, 4) == pytest.approx(3 / 4)


def test_intra_list_diversity():
  cats = np.array([0, 0, 1, 2])
  # Row 0: pairs (0,1)=0, (0,2)=1, (1,2)=1 -> 2/3. Row 1: one valid entry, no pair, left out.
  ranked = np.array([[0, 1, 2], [3, -1, -1]])
  assert M.intra_list_diversity(ranked, cats) == pytest.approx(2 / 3)
  emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  # Pairs: (0,1) cos 1 -> 0; (0,2) cos 0 -> 1; (1,2) -> 1; mean 2/3. Row 2: (0,3) cos -1 -> 2.
  ranked = np.array([[0, 1, 2], [0, 3, -1]])
  assert M.intra_list_diversity(ranked, emb) == pytest.approx((2 / 3 + 2) / 2)
  multi = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=bool)
  # Jaccard(0,1) = 1/2 -> 0.5; (0,2) -> 1; (1,2) -> 1.
  assert M.intra_list_diversity(np.array([[0, 1, 2]]), multi) == pytest.approx(2.5 / 3)
  assert M.intra_list_diversity(np.array([[0, -1]]), cats) == 0.0


def test_long_tail_share_and_constraints():
  is_tail = np.array([False, True, True, False])
  ranked = np.array([[1, 2, 0, -1],   # 2 of 4 slots
                     [3, 3, 1, 1]])   # only the first 1 counts: 1 of 4
  assert M.long_tail_share(ranked, is_tail) == pytest.approx(3 / 8)

  allowed = np.array([[True, False, True, False],
                      [False, True, False, True]])
  # Row 0: items 1 no, 2 yes, 0 yes, pad no -> 2. Row 1: 3 yes, repeat no, 1 yes, repeat no -> 2.
  assert M.constraint_satisfaction(ranked, allowed) == pytest.approx(4 / 8)
  even = lambda r: r % 2 == 0  # pads are -1 (odd) anyway; repeats must still be rejected
  assert M.constraint_satisfaction(np.array([[0, 0, 2, -2]]), even) == pytest.approx(2 / 4)


def test_ndcg_per_example_averages_to_ranking_metrics():
  ranked = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6], [0, 1, 2]])
  target = np.array([9, 1, 3, 2])  # ranks 2, 0, absent, 2
  rank = M.target_rank(ranked, target)
  np.testing.assert_array_equal(rank, [2, 0, -1, 2])
  per = M.ndcg_per_example(rank, 3)
  np.testing.assert_allclose(per, [0.5, 1.0, 0.0, 0.5])
  assert np.isclose(per.mean(), M.ranking_metrics(ranked, target, ks=(3,))["ndcg@3"])
  np.testing.assert_allclose(M.ndcg_per_example(rank, 2), [0.0, 1.0, 0.0, 0.0])


def test_paired_bootstrap():
  rng = np.random.default_rng(1)
  a = rng.random(400)
  same = M.paired_bootstrap(a, a)
  assert same["diff"] == same["ci95_low"] == same["ci95_high"] == 0.0
  # b = a - 0.05 + small noise: the paired interval is tight around 0.05 and excludes 0,
  # although the two score distributions overlap almost entirely.
  b = a - 0.05 + rng.normal(0, 0.01, 400)
  r = M.paired_bootstrap(a, b)
  assert r["ci95_low"] < r["diff"] < r["ci95_high"]
  assert 0.04 < r["ci95_low"] and r["ci95_high"] < 0.06
  assert r["num_examples"] == 400
  # Pure noise around the same mean: the interval covers 0, and its half-width is about
  # 1.96 standard errors of the mean difference.
  c = a + rng.normal(0, 0.2, 400)
  r = M.paired_bootstrap(a, c, num_resamples=4000)
  se = np.std(a - c) / np.sqrt(400)
  assert r["ci95_low"] < r["diff"] < r["ci95_high"]
  assert abs((r["ci95_high"] - r["ci95_low"]) / 2 - 1.96 * se) < 0.25 * 1.96 * se
  assert M.paired_bootstrap(a, c, seed=3) == M.paired_bootstrap(a, c, seed=3)
  with pytest.raises(ValueError, match="same 1-D shape"):
    M.paired_bootstrap(a, a[:10])
