"""Catalogue constraint tables for trie-constrained beam search (DESIGN §1.4, STYLE Decoding).

The allowed SIDs (one row of L codes per allowed item; level l has codes in [0, C_l)) form a
trie. It is stored as plain arrays, built once in NumPy on the host and passed to the jitted
search as ARGUMENTS, so a catalogue update or an instruction constraint (a Category request
decodes against the tables of that category's items) swaps arrays of the same shapes and does
not recompile. As in Google's STATIC decoder, a decode step only gathers the children of each
beam's current node, so its cost does not grow with the catalogue.

Node ids. The node at depth d (after d codes) is one distinct length-d prefix of the allowed
SIDs; nodes of one depth are numbered in lexicographic order of their prefixes:
  * depth 0: the root, node 0;
  * depth 1: node = the level-0 code itself (dense level);
  * depth d >= 2: the rank of the prefix among the distinct length-d prefixes.
Because children lists are written in lexicographic order too, the child reached through edge e
of a CSR level is node e of the next depth, so CSR levels need no separate child-node array.

Layout (`TrieTables`; capacity `cap` >= the number of allowed items, so every depth has at most
`cap` nodes):
  * `mask0` [C0] bool: level-0 codes that start an allowed SID.
  * `mask1` [C0, C1] bool: allowed (c0, c1) pairs (L >= 2).
  * `node2` [C0, C1] int32: depth-2 node id of the prefix (c0, c1), -1 if absent (L >= 2).
  * `indptr[i]` [cap + 1] int32 and `children[i]` [cap] int32, for level l = 2 + i (L >= 3):
    the children codes of depth-l node n are `children[i][indptr[i][n]:indptr[i][n + 1]]`,
    ascending; node ids past the last real node have no children.
  * `leaf_ids` [C0] (L == 1) or [cap] (L >= 2) int32: for each depth-L node, the id of its SID
    in the FULL catalogue's lexicographic list of distinct SIDs (the prefix id of
    `models.rq.prefix_buckets`, i.e. a row of its bucket table), -1 for padding. Subset tables
    keep the full catalogue's ids, so a constrained search still indexes the same buckets.
Every field may carry a leading batch axis [B, ...] (`stack_tables`): then row b of a batch
decodes against its own tables (a batch of Category requests for different categories).
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import numpy as np


@flax.struct.dataclass
class TrieTables:
  """Fixed-shape trie of the allowed SIDs; see the module docstring for the layout.

  Attributes:
    mask0: [C0] bool (or [B, C0]).
    mask1: [C0, C1] bool, None when L == 1.
    node2: [C0, C1] int32, None when L == 1.
    indptr: tuple over levels 2..L-1 of [cap + 1] int32.
    children: tuple over levels 2..L-1 of [cap] int32.
    leaf_ids: [C0] int32 when L == 1, else [cap] int32.
    codebook_sizes: static tuple (C_0, ..., C_{L-1}).
  """
  mask0: np.ndarray
  mask1: np.ndarray | None
  node2: np.ndarray | None
  indptr: tuple
  children: tuple
  leaf_ids: np.ndarray
  codebook_sizes: tuple = flax.struct.field(pytree_node=False)

  @property
  def levels(self) -> int:
    return len(self.codebook_sizes)

  @property
  def batched(self) -> bool:
    return np.ndim(self.mask0) == 2


def _keys(sids: np.ndarray, codebook_sizes: Sequence[int]) -> np.ndarray:
  """Mixed-radix key of each SID row; sorting keys sorts rows lexicographically."""
  if float(np.prod([float(c) for c in codebook_sizes])) >= 2.0 ** 62:
    raise ValueError(f"codebook sizes {tuple(codebook_sizes)} are too large for int64 keys")
  return np.ravel_multi_index(tuple(sids.T.astype(np.int64)), tuple(codebook_sizes))


def build_tables(sids: np.ndarray, codebook_sizes: Sequence[int], *,
                 items: np.ndarray | None = None, capacity: int | None = None) -> TrieTables:
  """Builds the constraint tables of (a subset of) the catalogue.

  Args:
    sids: [N, L] int, the full catalogue's SIDs (already cut to the L levels to decode: ℓ for
      SIGMA, all levels plus the de-duplication level for `gr_sid`).
    codebook_sizes: (C_0, ..., C_{L-1}).
    items: optional int indices (or [N] bool mask) of the allowed items; default all items.
    capacity: `cap`, the padded size of the CSR levels; default N. Tables built with the same
      `codebook_sizes` and `capacity` have the same shapes (no recompilation).

  Returns:
    `TrieTables` (NumPy arrays). Prefix ids in `leaf_ids` always refer to the full catalogue.

  Raises:
    ValueError: a code out of range, wrong shapes, or more allowed items than `capacity`.
  """
  sids = np.asarray(sids)
  codebook_sizes = tuple(int(c) for c in codebook_sizes)
  if sids.ndim != 2 or sids.shape[1] != len(codebook_sizes) or not codebook_sizes:
    raise ValueError(f"sids must be [N, L] with L = len(codebook_sizes) = {len(codebook_sizes)} "
                     f"> 0; got shape {sids.shape}")
  n, levels = sids.shape
  for l, c in enumerate(codebook_sizes):
    if n and (sids[:, l].min() < 0 or sids[:, l].max() >= c):
      raise ValueError(f"SID level {l} has codes outside [0, {c})")
  cap = n if capacity is None else int(capacity)
  full_keys = np.unique(_keys(sids, codebook_sizes))  # the catalogue's prefix ids, sorted
  if items is None:
    allowed = sids
  else:
    items = np.asarray(items)
    allowed = sids[items] if items.dtype != bool else sids[items.reshape(-1)]
  if len(allowed) > cap:
    raise ValueError(f"{len(allowed)} allowed items exceed the table capacity {cap}")
  keys = np.unique(_keys(allowed, codebook_sizes))  # [U] distinct allowed SIDs
  uniq = np.stack(np.unravel_index(keys, codebook_sizes), 1).astype(np.int64)  # [U, L]
  leaf = np.searchsorted(full_keys, keys).astype(np.int32)  # [U]

  c0 = codebook_sizes[0]
  mask0 = np.zeros(c0, bool)
  mask0[uniq[:, 0]] = True
  mask1 = node2 = None
  indptr, children = [], []
  if levels == 1:
    leaf_ids = np.full(c0, -1, np.int32)
    leaf_ids[uniq[:, 0]] = leaf
  else:
    c1 = codebook_sizes[1]
    mask1 = np.zeros((c0, c1), bool)
    mask1[uniq[:, 0], uniq[:, 1]] = True
    pairs = np.unique(uniq[:, 0] * c1 + uniq[:, 1])  # depth-2 nodes, lexicographic
    node2 = np.full((c0, c1), -1, np.int32)
    node2[pairs // c1, pairs % c1] = np.arange(len(pairs), dtype=np.int32)
    for l in range(2, levels):
      # Nodes of depth l and l + 1; the latter, in order, are the CSR edges out of the former.
      parent_keys = _keys(uniq[:, :l], codebook_sizes[:l])
      kid_keys, first = np.unique(_keys(uniq[:, :l + 1], codebook_sizes[:l + 1]),
                                  return_index=True)
      _, parent_of_kid = np.unique(parent_keys[first], return_inverse=True)
      counts = np.bincount(parent_of_kid.reshape(-1))  # [P_l]
      ptr = np.zeros(cap + 1, np.int32)
      ptr[1:len(counts) + 1] = np.cumsum(counts)
      ptr[len(counts) + 1:] = ptr[len(counts)]
      kids = np.zeros(cap, np.int32)
      kids[:len(kid_keys)] = uniq[first, l]
      indptr.append(ptr)
      children.append(kids)
    leaf_ids = np.full(cap, -1, np.int32)
    leaf_ids[:len(leaf)] = leaf
  return TrieTables(mask0=mask0, mask1=mask1, node2=node2, indptr=tuple(indptr),
                    children=tuple(children), leaf_ids=leaf_ids, codebook_sizes=codebook_sizes)


def subset_tables(sids: np.ndarray, codebook_sizes: Sequence[int], items: np.ndarray,
                  capacity: int | None = None) -> TrieTables:
  """Tables of the items satisfying an instruction (e.g. one category), padded to `capacity`.

  Args:
    sids: [N, L] the full catalogue's SIDs.
    codebook_sizes: (C_0, ..., C_{L-1}).
    items: int indices or [N] bool mask of the allowed items.
    capacity: default N, so the shapes equal those of the full catalogue's tables.

  Returns:
    `TrieTables` with the same shapes as `build_tables(sids, codebook_sizes)`.
  """
  return build_tables(sids, codebook_sizes, items=items,
                      capacity=len(sids) if capacity is None else capacity)


def stack_tables(tables: Sequence[TrieTables]) -> TrieTables:
  """Stacks per-example tables of one shape into batched tables (leading axis B).

  Args:
    tables: B unbatched `TrieTables` with equal codebook sizes and capacity.

  Returns:
    `TrieTables` whose every array has a leading [B] axis.
  """
  first = tables[0]
  for t in tables[1:]:
    if t.codebook_sizes != first.codebook_sizes or t.leaf_ids.shape != first.leaf_ids.shape:
      raise ValueError("stack_tables needs tables of one codebook layout and capacity")
  stack = lambda *xs: None if xs[0] is None else np.stack(xs)
  return TrieTables(
      mask0=stack(*[t.mask0 for t in tables]), mask1=stack(*[t.mask1 for t in tables]),
      node2=stack(*[t.node2 for t in tables]),
      indptr=tuple(np.stack(x) for x in zip(*[t.indptr for t in tables])),
      children=tuple(np.stack(x) for x in zip(*[t.children for t in tables])),
      leaf_ids=stack(*[t.leaf_ids for t in tables]), codebook_sizes=first.codebook_sizes)


def allowed_children(tables: TrieTables, prefix: Sequence[int]) -> np.ndarray:
  """Host-side lookup (tests, debugging): the codes allowed after `prefix`.

  Args:
    tables: unbatched `TrieTables`.
    prefix: the codes of levels 0..d-1, d < L.

  Returns:
    Sorted int array of the level-d codes that continue `prefix` to an allowed SID.
  """
  d = len(prefix)
  if d == 0:
    return np.flatnonzero(tables.mask0)
  if not tables.mask0[prefix[0]]:
    return np.zeros(0, np.int64)
  if d == 1:
    return np.flatnonzero(tables.mask1[prefix[0]])
  node = int(tables.node2[prefix[0], prefix[1]])
  for l in range(2, d + 1):
    if node < 0:
      return np.zeros(0, np.int64)
    ptr, kids = tables.indptr[l - 2], tables.children[l - 2]
    codes = kids[ptr[node]:ptr[node + 1]]
    if l == d:
      return codes.astype(np.int64)
    hit = np.flatnonzero(codes == prefix[l])
    node = int(ptr[node] + hit[0]) if len(hit) else -1
  raise AssertionError("unreachable")
