"""Host-side constrained beam search, the way open PyTorch recommenders write it.

TIGER-style reimplementations decode with a Python `prefix -> allowed tokens` callback (the
HuggingFace `prefix_allowed_tokens_fn`) evaluated per beam per step, one jitted/compiled model
call per step, and top-k on the host. This module does the same around the model step that
`beam.constrained_beam_search` uses, so the decode benchmark compares the two on one model; the
tests check both return the same beams.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def prefix_allowed_fn(sids: np.ndarray) -> Callable[[tuple[int, ...]], list[int]]:
  """A dict trie of the allowed SIDs behind a `prefix -> allowed next codes` callback.

  Args:
    sids: [N, L] int SIDs of the allowed items.

  Returns:
    fn(prefix tuple of d < L codes) -> sorted list of level-d codes (empty if none).
  """
  nxt = defaultdict(set)
  for row in np.asarray(sids).tolist():
    for d in range(len(row)):
      nxt[tuple(row[:d])].add(row[d])
  table = {p: sorted(c) for p, c in nxt.items()}
  return lambda prefix: table.get(tuple(prefix), [])


@functools.lru_cache(maxsize=None)
def _jitted(step_fn):
  step = jax.jit(step_fn)
  reorder = jax.jit(lambda cache, rows: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache))
  return step, reorder


def host_beam_search(step_fn: Callable[..., tuple[jax.Array, Any]], model_state: Any,
                     start_tokens: np.ndarray, cache: Any,
                     allowed_fn: Callable[[tuple[int, ...]], Sequence[int]], *, num_beams: int,
                     token_offset: Sequence[int], codebook_sizes: Sequence[int],
                     renormalize: bool = True, level_logits: bool = False):
  """Beam search with the constraint and the top-k on the host, one device call per step.

  Args:
    step_fn: `step_fn(model_state, tokens [B*K], cache, step) -> (logits [B*K, V], cache)`
      (the same callback as `beam.constrained_beam_search`).
    model_state: passed to `step_fn`.
    start_tokens: [B] int, each prompt's last token.
    cache: B-row model cache (prompt minus its last token).
    allowed_fn: prefix tuple -> allowed codes (`prefix_allowed_fn`).
    num_beams: K.
    token_offset: L ints; level l's code c is token token_offset[l] + c.
    codebook_sizes: L ints.
    renormalize: softmax over the allowed codes only (as `beam.beam_search`).
    level_logits: `step_fn` returns [B*K, W] level-code logits (as `beam.beam_search`).

  Returns:
    sequences [B, K, L] int (-1 invalid), scores [B, K] float32 (-inf invalid), valid [B, K].
  """
  step, reorder = _jitted(step_fn)
  start_tokens = np.asarray(start_tokens)
  b_size, k_size, levels = len(start_tokens), int(num_beams), len(codebook_sizes)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k_size, axis=0), cache)
  seqs = np.zeros((b_size, k_size, 0), np.int64)
  scores = np.full((b_size, k_size), -np.inf, np.float32)
  scores[:, 0] = 0.0
  tokens = np.repeat(start_tokens, k_size)
  for level in range(levels):
    c, off = int(codebook_sizes[level]), int(token_offset[level])
    logits, cache = step(model_state, jnp.asarray(tokens, jnp.int32), cache,
                         jnp.int32(level))
    first = 0 if level_logits else off
    logits = np.asarray(logits, np.float32)[:, first:first + c].reshape(b_size, k_size, c)
    logp = np.full((b_size, k_size, c), -np.inf, np.float32)
    for b in range(b_size):
      for k in range(k_size):
        if scores[b, k] == -np.inf:
          continue
        allowed = list(allowed_fn(tuple(int(x) for x in seqs[b, k])))
        if not allowed:
          continue
        row = logits[b, k]
        z = row[allowed] if renormalize else row
        lse = np.log(np.sum(np.exp(z - z.max()))) + z.max()
        logp[b, k, allowed] = row[allowed] - lse
    cand = (scores[..., None] + logp).reshape(b_size, k_size * c)
    top = np.argsort(-cand, axis=1, kind="stable")[:, :k_size]  # [B, K]
    parent, code = top // c, top % c
    scores = np.take_along_axis(cand, top, axis=1)
    seqs = np.concatenate([np.take_along_axis(seqs, parent[..., None], axis=1), code[..., None]],
                          axis=2)
    rows = (np.arange(b_size)[:, None] * k_size + parent).reshape(-1)
    cache = reorder(cache, jnp.asarray(rows, jnp.int32))
    tokens = (off + code).reshape(-1)
  valid = np.isfinite(scores)
  return np.where(valid[..., None], seqs, -1), scores, valid
