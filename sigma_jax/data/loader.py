"""Loading a built dataset, its splits, and deterministic resumable batch orders.

Batches are positions in a `grain.MapDataset`: batch ``step`` is ``dataset[step]``, a pure
function of (seed, step), so a resumed run continues exactly where it stopped by storing the
step alone. Every host computes the same global batch of record indices and keeps its own
contiguous slice (per-host sharding); the global batch is then identical to a one-host run.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import grain
import numpy as np

from sigma_jax.data import builders, raw, splits as splits_lib


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset as every stage sees it."""
  raw: raw.RawDataset
  splits: splits_lib.Splits

  @property
  def num_items(self) -> int:
    return len(self.raw.items)


def tfds_dir(cfg, workdir: str) -> str:
  return cfg.dataset.tfds_dir or os.path.join(workdir, "tfds")


@functools.lru_cache(maxsize=4)
def _load(name: str, fmt: str, directory: str, max_history: int) -> Dataset:
  data = builders.load(name, directory, fmt)
  ts = [u.timestamps for u in data.users] if data.has_timestamps else None
  split = splits_lib.leave_one_out(range(len(data.users)), [u.items for u in data.users],
                                   len(data.items), max_history, timestamps=ts)
  return Dataset(raw=data, splits=split)


def load_dataset(cfg, workdir: str) -> Dataset:
  """The dataset built by the ``data`` stage, with TIGER's leave-one-out splits (memoised)."""
  return _load(cfg.dataset.name, cfg.dataset.format, tfds_dir(cfg, workdir),
               int(cfg.dataset.max_history))


def index_batches(num_records: int, global_batch: int, seed: int, shuffle: bool = True,
                  drop_remainder: bool = True) -> grain.MapDataset:
  """An endless dataset of [global_batch] record-index arrays; a new permutation each epoch.

  ``ds[step]`` is the step's batch. With ``drop_remainder`` a batch may span two epochs, so
  every step has the same shape; ``steps_per_epoch`` tells how many steps make one pass.
  """
  if num_records <= 0:
    raise ValueError("no records to batch")
  if global_batch <= 0:
    raise ValueError(f"batch size must be positive, got {global_batch}")
  ds = grain.MapDataset.range(num_records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat().batch(global_batch, drop_remainder=drop_remainder)


class GroupedBatches:
  """An endless sequence of [global_batch] record-index arrays that keeps each group's records
  side by side: each epoch shuffles the groups (a record of group -1 is a group of its own),
  lays every group's records out in their given order, and cuts the result into batches (a
  batch may span two epochs, a group two batches). ``batches[step]`` is a pure function of
  (groups, seed, step), like `index_batches`."""

  def __init__(self, groups, global_batch: int, seed: int):
    groups = np.asarray(groups, np.int64)
    if len(groups) == 0:
      raise ValueError("no records to batch")
    if global_batch <= 0:
      raise ValueError(f"batch size must be positive, got {global_batch}")
    alone = groups < 0
    keys = np.where(alone, groups.max(initial=0) + 1 + np.arange(len(groups)), groups)
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
    self._blocks = np.split(order, starts[1:])
    self._n, self._batch, self._seed = len(groups), int(global_batch), int(seed)

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._blocks))
    return np.concatenate([self._blocks[b] for b in perm])

  def __len__(self) -> int:
    return np.iinfo(np.int64).max // self._batch

  def __getitem__(self, step: int) -> np.ndarray:
    first = int(step) * self._batch
    idx = np.arange(first, first + self._batch)
    epochs = idx // self._n
    return np.concatenate([self._epoch(int(e))[idx[epochs == e] % self._n]
                           for e in np.unique(epochs)])


def grouped_batches(groups, global_batch: int, seed: int) -> GroupedBatches:
  """See `GroupedBatches`."""
  return GroupedBatches(groups, global_batch, seed)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  return max(1, num_records // global_batch)


def host_slice(batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This host's contiguous part of a global batch (leading axis)."""
  if len(batch) % process_count:
    raise ValueError(f"global batch {len(batch)} is not divisible by {process_count} processes")
  per = len(batch) // process_count
  return batch[process_index * per:(process_index + 1) * per]
