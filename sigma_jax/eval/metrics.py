"""Recommendation metrics over ranked item lists (NumPy, host side).

Every function takes ``ranked`` [B, K'] int: row b is the recommendation list for user b, best
first, with 0-based item indices. An entry is *invalid* when it is ``PAD_ITEM`` (-1) or any other
negative value, when it is ``>= num_items`` (where ``num_items`` is known), or when it repeats an
item already listed earlier in the same row. Invalid entries are never hits, never satisfy a
constraint, and count as neither tail items nor categories; ``invalid_share`` reports how many
there are (DESIGN §4: it must be zero by construction).

With a single target per user HR@K and Recall@K are the same number; both keys are reported.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def valid_mask(ranked: np.ndarray, num_items: int | None = None) -> np.ndarray:
  """Marks the valid entries of ranked lists.

  Args:
    ranked: [B, K] int item indices, PAD_ITEM (-1) for padding.
    num_items: N; when given, indices >= N are invalid too.

  Returns:
    [B, K] bool, False for padding, out-of-range items and repeats of an earlier entry in the row.
  """
  ranked = np.asarray(ranked)
  ok = ranked >= 0
  if num_items is not None:
    ok &= ranked < num_items
  if ranked.shape[1] > 1:
    # A repeat is an entry equal to any earlier entry of its row; a stable sort groups equal
    # values while keeping their original order, so only the first of each group survives.
    order = np.argsort(ranked, axis=1, kind="stable")
    srt = np.take_along_axis(ranked, order, axis=1)
    rep_sorted = np.zeros_like(ok)
    rep_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    rep = np.zeros_like(ok)
    np.put_along_axis(rep, order, rep_sorted, axis=1)
    ok &= ~rep
  return ok


def invalid_share(ranked: np.ndarray, num_items: int | None = None) -> float:
  """Fraction of list entries that are invalid (padding, out of range, or repeated).

  Args:
    ranked: [B, K] int.
    num_items: N, or None to skip the range check.

  Returns:
    The share in [0, 1], over all B*K entries.
  """
  ranked = np.asarray(ranked)
  if ranked.size == 0:
    return 0.0
  return float(1.0 - valid_mask(ranked, num_items).mean())


def target_rank(ranked: np.ndarray, target: np.ndarray) -> np.ndarray:
  """0-based position of each user's target in its list.

  Args:
    ranked: [B, K] int.
    target: [B] int, one target item per user.

  Returns:
    [B] int, the rank of the first valid occurrence of the target, or -1 when it is absent.
  """
  ranked = np.asarray(ranked)
  target = np.asarray(target).reshape(-1)
  hit = (ranked == target[:, None]) & valid_mask(ranked) & (target[:, None] >= 0)  # [B, K]
  return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def hit_rate_at_k(ranked: np.ndarray, target: np.ndarray, k: int) -> float:
  """HR@K (= Recall@K with one target): share of users whose target is in their top K.

  Args:
    ranked: [B, K'] int, K' >= k.
    target: [B] int.
    k: cut-off.

  Returns:
    The mean over the B users.
  """
  _check_k(ranked, k)
  rank = target_rank(np.asarray(ranked)[:, :k], target)
  return float(np.mean(rank >= 0)) if rank.size else 0.0


def ndcg_at_k(ranked: np.ndarray, target: np.ndarray, k: int) -> float:
  """NDCG@K with one relevant item: 1/log2(rank + 2) when the target is at 0-based rank < k.

  The ideal DCG of a single relevant item is 1, so no further normalisation is needed. Arguments
  and result as for `hit_rate_at_k`.
  """
  _check_k(ranked, k)
  rank = target_rank(np.asarray(ranked)[:, :k], target)
  gain = np.where(rank >= 0, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
  return float(np.mean(gain)) if gain.size else 0.0


def ranking_metrics(ranked: np.ndarray, target: np.ndarray,
                    ks: Sequence[int] = (1, 5, 10, 20),
                    num_items: int | None = None) -> dict:
  """HR / Recall / NDCG at several cut-offs, plus the invalid share of the longest cut-off.

  Args:
    ranked: [B, K'] int with K' >= max(ks).
    target: [B] int.
    ks: cut-offs.
    num_items: N, used only for the range check of ``invalid@K``.

  Returns:
    {'recall@k', 'hr@k', 'ndcg@k' for each k in ks, 'invalid@K' for K = max(ks)} of floats.
  """
  ranked = np.asarray(ranked)
  kmax = max(ks)
  _check_k(ranked, kmax)
  rank = target_rank(ranked[:, :kmax], target)  # [B]
  out = {}
  for k in ks:
    hit = (rank >= 0) & (rank < k)
    gain = ndcg_per_example(rank, k)
    out[f"recall@{k}"] = out[f"hr@{k}"] = float(hit.mean()) if hit.size else 0.0
    out[f"ndcg@{k}"] = float(gain.mean()) if gain.size else 0.0
  out[f"invalid@{kmax}"] = invalid_share(ranked[:, :kmax], num_items)
  return out


def category_coverage(ranked: np.ndarray, item_categories: np.ndarray,
                      num_categories: int) -> float:
  """Mean over users of (distinct categories in the list) / num_categories.

  The denominator is the size of the whole category set, so 1.0 means a list touches every
  category; a list of K items with one category each can reach at most K / num_categories.

  Args:
    ranked: [B, K] int.
    item_categories: [N] int category of each item (-1: none), or [N, C] bool multi-hot.
    num_categories: C.

  Returns:
    The mean coverage in [0, 1].
  """
  ranked = np.asarray(ranked)
  cats = np.asarray(item_categories)
  ok = valid_mask(ranked, cats.shape[0])
  safe = np.where(ok, ranked, 0)
  covered = np.zeros((ranked.shape[0], num_categories), dtype=bool)  # [B, C]
  if cats.ndim == 1:
    c = cats[safe]  # [B, K]
    keep = ok & (c >= 0) & (c < num_categories)
    rows = np.broadcast_to(np.arange(ranked.shape[0])[:, None], ranked.shape)
    covered[rows[keep], c[keep]] = True
  else:
    covered = (cats[safe].astype(bool) & ok[..., None]).any(axis=1)[:, :num_categories]
  return float(covered.sum(axis=1).mean() / num_categories) if ranked.shape[0] else 0.0


def intra_list_diversity(ranked: np.ndarray, item_features: np.ndarray) -> float:
  """Mean pairwise dissimilarity inside each list, averaged over users.

  The dissimilarity of two items depends on what ``item_features`` is:
    * float [N, D] embeddings: 1 - cosine similarity;
    * int [N] category per item: 1 if the categories differ, else 0 (two items without a
      category, -1, count as the same);
    * bool [N, C] multi-hot categories: 1 - Jaccard similarity (two empty sets: 0).
  Only the valid entries of a list form pairs; lists with fewer than two valid entries have no
  pairs and are left out of the average.

  Args:
    ranked: [B, K] int.
    item_features: one of the three forms above.

  Returns:
    The mean, or 0.0 when no list has a pair.
  """
  ranked = np.asarray(ranked)
  feats = np.asarray(item_features)
  ok = valid_mask(ranked, feats.shape[0])  # [B, K]
  safe = np.where(ok, ranked, 0)
  if feats.dtype == bool:
    x = feats[safe].astype(np.float64)  # [B, K, C]
    inter = np.einsum("bic,bjc->bij", x, x)
    size = x.sum(-1)
    union = size[:, :, None] + size[:, None, :] - inter
    dis = np.where(union > 0, 1.0 - inter / np.maximum(union, 1e-12), 0.0)
  elif np.issubdtype(feats.dtype, np.integer):
    c = feats[safe]  # [B, K]
    dis = (c[:, :, None] != c[:, None, :]).astype(np.float64)
  else:
    x = feats[safe].astype(np.float64)  # [B, K, D]
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    dis = 1.0 - np.einsum("bid,bjd->bij", x, x)
  k = ranked.shape[1]
  pair = ok[:, :, None] & ok[:, None, :] & np.triu(np.ones((k, k), dtype=bool), 1)  # [B, K, K]
  npairs = pair.sum(axis=(1, 2))
  has = npairs > 0
  if not has.any():
    return 0.0
  per_list = (dis * pair).sum(axis=(1, 2))[has] / npairs[has]
  return float(per_list.mean())


def long_tail_share(ranked: np.ndarray, is_tail: np.ndarray) -> float:
  """Share of list slots holding a long-tail item, averaged over users.

  The denominator is the list length K, so invalid entries count as non-tail slots.

  Args:
    ranked: [B, K] int.
    is_tail: [N] bool, True for items in the low-popularity tail.

  Returns:
    The share in [0, 1].
  """
  ranked = np.asarray(ranked)
  is_tail = np.asarray(is_tail, dtype=bool)
  if ranked.size == 0:
    return 0.0
  ok = valid_mask(ranked, is_tail.shape[0])
  tail = ok & is_tail[np.where(ok, ranked, 0)]
  return float(tail.mean())


def constraint_satisfaction(ranked: np.ndarray,
                            allowed: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> float:
  """Share of list slots whose item satisfies the user's constraint, averaged over users.

  Args:
    ranked: [B, K] int.
    allowed: [B, N] bool (row b: items allowed for user b), or a callable mapping ``ranked``
      [B, K] to [B, K] bool. The callable sees the raw list including invalid entries; they are
      counted as unsatisfied whatever it returns.

  Returns:
    The share in [0, 1]; invalid entries count as unsatisfied.
  """
  ranked = np.asarray(ranked)
  if ranked.size == 0:
    return 0.0
  if callable(allowed):
    ok = valid_mask(ranked)
    sat = np.asarray(allowed(ranked), dtype=bool)
  else:
    allowed = np.asarray(allowed, dtype=bool)
    ok = valid_mask(ranked, allowed.shape[1])
    sat = np.take_along_axis(allowed, np.where(ok, ranked, 0), axis=1)
  return float((sat & ok).mean())


def _check_k(ranked: np.ndarray, k: int) -> None:
  if k < 1 or k > np.asarray(ranked).shape[1]:
    raise ValueError(f"cut-off {k} needs lists of at least {k} items; got "
                     f"{np.asarray(ranked).shape[1]}")


def ndcg_per_example(rank: np.ndarray, k: int) -> np.ndarray:
  """Each example's NDCG@k from its target's 0-based rank (-1: not in the list); one target."""
  rank = np.asarray(rank)
  hit = (rank >= 0) & (rank < k)
  return np.where(hit, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_resamples: int = 2000,
                     seed: int = 0) -> dict:
  """Mean of a - b over the same examples, with a 95% percentile interval from resampling
  examples (both systems keep each resampled example, so the pairing is preserved).

  Args:
    a, b: [M] per-example scores of two systems on the same M examples, in the same order.
    num_resamples: bootstrap resamples.
    seed: seeds the resampling, so the interval is reproducible.

  Returns:
    {"diff", "ci95_low", "ci95_high", "num_examples"}.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired scores need the same 1-D shape, got {a.shape} and {b.shape}")
  if not a.size:
    raise ValueError("paired_bootstrap needs at least one example")
  d = a - b
  idx = np.random.default_rng(seed).integers(0, d.size, size=(num_resamples, d.size))
  means = d[idx].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"diff": float(d.mean()), "ci95_low": float(lo), "ci95_high": float(hi),
          "num_examples": int(d.size)}
