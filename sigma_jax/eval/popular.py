"""The ``popular`` row: the most popular training items, ranked through the generator's interface.

A baseline with no model: every example's list is the catalogue in order of training-split
popularity (``tasks.train_popularity``; ties: lower item index first), restricted as the
generator restricts it -- to the allowed items of a hard-constraint task (Query, Category), and
without the history's items when ``dataset.exclude_history`` is on. The exploratory tasks'
item rules (Longtail, Discover) are not hard constraints, so, as for every other row, they do
not restrict the list. ``PopularRanker.recommend`` has the generator's signature, so
``sigma_jax.eval.evaluate`` ranks and scores this row with the same code as every model row.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sigma_jax.data import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class PopularSpec:
  """The one decoding setting a ranked list needs: its length."""
  top_n: int


@dataclasses.dataclass
class PopularRanked:
  """A ranked list per example; ``items`` [B, top_n] int32, -1 where fewer items are allowed."""
  items: np.ndarray


class PopularRanker:
  """Most popular training items first, as a drop-in for ``generator.Generator`` in evaluation.

  Attributes:
    mode: "popular".
    spec: PopularSpec (``generation.top_n``).
    exclude_history: the history items are never returned (``dataset.exclude_history``).
    order: [N] int64 item indices, most popular in training first, ties by lower index.
  """

  mode = "popular"

  def __init__(self, cfg, ds, exclude_history: bool | None = None):
    pop = tasks_lib.train_popularity(ds.splits)
    self.num_items = len(pop)
    self.order = np.lexsort((np.arange(len(pop)), -pop))
    self.spec = PopularSpec(top_n=int(cfg.generation.top_n))
    self.exclude_history = bool(cfg.dataset.exclude_history
                                if exclude_history is None else exclude_history)

  def recommend(self, histories, instructions, allowed: np.ndarray | None = None,
                tau: float | None = None) -> PopularRanked:
    """The ``top_n`` most popular allowed items for each example.

    Args:
      histories: [B, H] item indices (PAD_ITEM < 0 for padding).
      instructions: B instruction strings (unused: popularity ignores the instruction).
      allowed: [B, N] bool, the items a hard constraint allows, or None (all).
      tau: unused (no APF).

    Returns:
      PopularRanked with items [B, top_n].
    """
    del instructions, tau
    histories = np.asarray(histories, np.int64)
    b, n = len(histories), self.num_items
    mask = np.ones((b, n), bool) if allowed is None else np.array(allowed, bool)
    if self.exclude_history:
      for r, h in enumerate(histories):
        mask[r, h[(h >= 0) & (h < n)]] = False
    out = np.full((b, self.spec.top_n), -1, np.int32)
    for r in range(b):
      top = self.order[mask[r, self.order]][:self.spec.top_n]
      out[r, :len(top)] = top
    return PopularRanked(items=out)
