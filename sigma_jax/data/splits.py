"""TIGER's leave-one-out protocol.

For every user with items ``s_1..s_n`` (chronological, 0-based item indices):
test target ``s_n`` with history ``s_1..s_{n-1}``; validation target ``s_{n-1}`` with history
``s_1..s_{n-2}``; training part ``s_1..s_{n-2}``. Histories are truncated to the last
``max_history`` items and left-padded with ``PAD_ITEM`` so the most recent item is always in the
last column.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PAD_ITEM = -1  # padding value in every padded item array; real items are 0..num_items-1


@dataclasses.dataclass(frozen=True)
class Splits:
  """Leave-one-out splits of one dataset.

  Attributes:
    num_items: N, the size of the item table.
    users: [U] user indices, in the order of the rows below.
    train_seqs: U arrays, the training part of each user's sequence (may be shorter than 2).
    valid_hist: [U, H] int32, left-padded with PAD_ITEM.
    valid_target: [U] int32.
    test_hist: [U, H] int32 (the validation target is its last item).
    test_target: [U] int32.
    train_ts, valid_ts, test_ts: timestamps aligned with the above when the data has them, else None.
  """
  num_items: int
  users: np.ndarray
  train_seqs: list
  valid_hist: np.ndarray
  valid_target: np.ndarray
  test_hist: np.ndarray
  test_target: np.ndarray
  train_ts: list | None = None
  valid_ts: np.ndarray | None = None
  test_ts: np.ndarray | None = None

  def counts(self) -> dict:
    return {
        "train": {"users": len(self.train_seqs),
                  "interactions": int(sum(len(s) for s in self.train_seqs))},
        "validation": {"users": int(len(self.valid_target)),
                       "interactions": int(len(self.valid_target))},
        "test": {"users": int(len(self.test_target)), "interactions": int(len(self.test_target))},
    }


def left_pad(seqs: Sequence[np.ndarray], length: int, pad=PAD_ITEM, dtype=np.int32) -> np.ndarray:
  """Keeps the last ``length`` entries of each sequence, left-padded with ``pad``."""
  out = np.full((len(seqs), length), pad, dtype=dtype)
  for r, s in enumerate(seqs):
    s = np.asarray(s)[-length:] if length > 0 else np.asarray(s)[:0]
    if len(s):
      out[r, length - len(s):] = s
  return out


def leave_one_out(users: Sequence[int], sequences: Sequence[np.ndarray], num_items: int,
                  max_history: int = 20,
                  timestamps: Sequence[np.ndarray] | None = None) -> Splits:
  """Splits per-user chronological sequences as TIGER does.

  Raises:
    ValueError: a user has fewer than 3 interactions (then the user has no training item), or an
      item index is out of range.
  """
  if max_history < 1:
    raise ValueError(f"max_history must be >= 1, got {max_history}")
  seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
  for u, s in zip(users, seqs):
    if len(s) < 3:
      raise ValueError(f"user {u} has {len(s)} interactions; leave-one-out needs at least 3")
    if s.min() < 0 or s.max() >= num_items:
      raise ValueError(f"user {u} has an item index outside [0, {num_items})")
  train = [s[:-2].astype(np.int32) for s in seqs]
  splits = dict(
      num_items=int(num_items), users=np.asarray(users, dtype=np.int64), train_seqs=train,
      valid_hist=left_pad([s[:-2] for s in seqs], max_history),
      valid_target=np.array([s[-2] for s in seqs], dtype=np.int32),
      test_hist=left_pad([s[:-1] for s in seqs], max_history),
      test_target=np.array([s[-1] for s in seqs], dtype=np.int32))
  if timestamps is not None:
    ts = [np.asarray(t, dtype=np.int64) for t in timestamps]
    splits.update(train_ts=[t[:-2] for t in ts],
                  valid_ts=np.array([t[-2] for t in ts], dtype=np.int64),
                  test_ts=np.array([t[-1] for t in ts], dtype=np.int64))
  return Splits(**splits)
