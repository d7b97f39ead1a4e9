"""Relevance pairs (i, i+) for semantic grounding, from several views (DESIGN §1.1).

- collaborative: items within ``window`` steps of each other in one user's training sequence;
- semantic: items sharing a leaf category, a distinctive title term, or a tag;
- knowledge: items one user interacted with in the same season of the same year, or in the
  same holiday window (only where the data has timestamps).

Pairs come only from the training split and the item table, never from validation or test
targets. Each view is a pool of pairs built once in NumPy; a batch draws from the pools with an
RNG seeded by (seed, step), so batch ``step`` is reproducible and a resumed run continues exactly.
"""
from __future__ import annotations

import collections
import re

import numpy as np

VIEWS = ("collaborative", "semantic", "knowledge")

# (month, day) of fixed-date holidays; a window is the `holiday_days` days up to and including it.
HOLIDAYS = {"new_year": (1, 1), "valentines_day": (2, 14), "independence_day": (7, 4),
            "halloween": (10, 31), "christmas": (12, 25)}
_STOP = frozenset("with from that this your for and the oz ml pack count set size inch new "
                  "black white free".split())


def _calendar(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """UTC (year, month 1..12, day as datetime64[D]) of unix-second timestamps, vectorised."""
  days = np.asarray(ts, np.int64).astype("datetime64[s]").astype("datetime64[D]")
  months = days.astype("datetime64[M]")
  years = months.astype("datetime64[Y]")
  return (years.astype(np.int64) + 1970, (months.astype(np.int64) % 12) + 1, days)


def season_of(ts: np.ndarray) -> np.ndarray:
  """Meteorological season (0 winter, 1 spring, 2 summer, 3 autumn; northern hemisphere)."""
  _, months, _ = _calendar(ts)
  return (months % 12) // 3


def holiday_of(ts: np.ndarray, days: int) -> np.ndarray:
  """Index into HOLIDAYS of the holiday window each timestamp falls in, or -1.

  A window is the ``days`` days up to and including the holiday (shopping before it).
  """
  years, _, d = _calendar(ts)
  out = np.full(len(d), -1, np.int64)
  best = np.full(len(d), days, np.int64)  # overlapping windows: the nearest holiday wins
  for h, (m, day) in enumerate(HOLIDAYS.values()):
    for dy in (0, 1):  # a late-December date can be in the window of next year's New Year
      date = (np.datetime64("1970-01-01", "D") +
              (np.array([f"{y + dy:04d}-{m:02d}-{day:02d}" for y in np.unique(years)],
                        "datetime64[D]") - np.datetime64("1970-01-01", "D"))[
                            np.searchsorted(np.unique(years), years)])
      gap = (date - d).astype(np.int64)
      hit = (gap >= 0) & (gap < best)
      out, best = np.where(hit, h, out), np.where(hit, gap, best)
  return out


def _dedup(pairs: list) -> np.ndarray:
  """Unique pairs without self-pairs, from a list of [n, 2] arrays."""
  pairs = [np.asarray(p, np.int64).reshape(-1, 2) for p in pairs]
  if not pairs:
    return np.zeros((0, 2), np.int64)
  arr = np.unique(np.concatenate(pairs), axis=0)
  return arr[arr[:, 0] != arr[:, 1]]


def collaborative_pairs(train_seqs, window: int) -> np.ndarray:
  out = []
  for s in train_seqs:
    for k in range(1, window + 1):
      if len(s) > k:
        out.append(np.stack([s[:-k], s[k:]], axis=1))
  return _dedup(out)


def _group_pairs(groups, rng: np.random.Generator, per_item: int, max_group: int) -> list:
  """Pairs each member of each group with `per_item` random other members (repeats dropped)."""
  out = []
  for members in groups:
    members = np.unique(np.asarray(members, np.int64))
    n = len(members)
    if n < 2 or n > max_group:
      continue
    anchor = np.repeat(np.arange(n), min(per_item, n - 1))
    partner = (anchor + rng.integers(1, n, size=len(anchor))) % n  # never the anchor itself
    out.append(np.stack([members[anchor], members[partner]], axis=1))
  return out


def title_terms(title: str) -> set:
  return {w for w in re.findall(r"[a-z][a-z\-']{3,}", title.lower()) if w not in _STOP}


def semantic_pairs(items, seed: int, per_item: int = 4, max_group: int = 2000) -> np.ndarray:
  rng = np.random.default_rng(seed)
  by_leaf, by_term, by_tag = (collections.defaultdict(list) for _ in range(3))
  for idx, it in enumerate(items):
    if it.category_path:
      # The full path: a leaf name can repeat under different parents; for MovieLens it is the
      # genre combination, a much finer grouping than any single genre.
      by_leaf[tuple(it.category_path)].append(idx)
    # Sorted: a set of strings iterates in PYTHONHASHSEED order, which would reorder the groups
    # and so the random partners drawn for them, a different pair pool in every process.
    for w in sorted(title_terms(it.title)):
      by_term[w].append(idx)
    for t in it.tags:
      by_tag[t].append(idx)
  # Distinctive terms only: frequent words ("shampoo") say little, a brand or model name says a
  # lot; groups above max_group are skipped for the same reason.
  terms = [m for m in by_term.values() if 2 <= len(m) <= 50]
  out = (_group_pairs(by_leaf.values(), rng, per_item, max_group) +
         _group_pairs(terms, rng, per_item, max_group) +
         _group_pairs(by_tag.values(), rng, per_item, max_group))
  return _dedup(out)


def knowledge_pairs(train_seqs, train_ts, seed: int, holiday_days: int = 14,
                    per_item: int = 2) -> np.ndarray:
  if train_ts is None:
    return np.zeros((0, 2), np.int64)
  rng = np.random.default_rng(seed)
  groups = []
  for s, ts in zip(train_seqs, train_ts):
    if len(s) < 2:
      continue
    years, months, _ = _calendar(ts)
    season = (months % 12) // 3
    # Winter spans two calendar years: December belongs to the next year's winter.
    years = years + (months == 12)
    for key in set(zip(years.tolist(), season.tolist())):
      groups.append(s[(years == key[0]) & (season == key[1])])
    hol = holiday_of(ts, holiday_days)
    for h in set(hol.tolist()) - {-1}:
      groups.append(s[hol == h])
  return _dedup(_group_pairs(groups, rng, per_item, max_group=10**9))


def build_pools(dataset, gcfg, seed: int) -> dict:
  """The pair pool of every configured view that the data allows: {view: [P, 2]}."""
  views = [v.strip() for v in gcfg.views.split(",") if v.strip()]
  unknown = set(views) - set(VIEWS)
  if unknown:
    raise ValueError(f"ground.views has unknown view(s) {sorted(unknown)}; choose from {VIEWS}")
  s = dataset.splits
  pools = {}
  if "collaborative" in views:
    pools["collaborative"] = collaborative_pairs(s.train_seqs, int(gcfg.window))
  if "semantic" in views:
    pools["semantic"] = semantic_pairs(dataset.raw.items, seed)
  if "knowledge" in views and s.train_ts is not None:
    pools["knowledge"] = knowledge_pairs(s.train_seqs, s.train_ts, seed + 1,
                                         int(gcfg.holiday_days))
  pools = {k: v for k, v in pools.items() if len(v)}
  if not pools:
    raise ValueError(f"no relevance pairs from views {views} on {dataset.raw.name}")
  return pools


def sample_pairs(pools: dict, batch: int, seed: int, step: int) -> np.ndarray:
  """[batch, 2] pairs for one step: an equal share from each view, random order within."""
  rng = np.random.default_rng([seed, step])
  names = sorted(pools)
  counts = np.full(len(names), batch // len(names))
  counts[: batch - counts.sum()] += 1
  parts = [pools[n][rng.integers(0, len(pools[n]), size=c)] for n, c in zip(names, counts)]
  out = np.concatenate(parts)
  flip = rng.random(len(out)) < 0.5  # the relation is symmetric; show both directions
  out[flip] = out[flip][:, ::-1]
  return out[rng.permutation(len(out))]
