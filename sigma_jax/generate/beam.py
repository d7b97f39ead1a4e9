"""Trie-constrained beam search over SID codes, on device (DESIGN §1.4 step 1, STYLE Decoding).

One `lax.while_loop` over a fixed-shape `BeamState`; the model is a callback

  tokens_to_logits(tokens [B*K], cache, step) -> (logits [B*K, V], new cache)

that feeds one token per row and returns next-token logits over the whole vocabulary; `step` is
the SID level being predicted (int32 scalar). Level l's code c is token `token_offset[l] + c`.
With `level_logits=True` the callback returns that level's code logits only, [B*K, W] with
W = max C_l: column c is the logit of token `token_offset[step] + c` (columns >= C_step are
ignored). Only the level's codes enter the log-softmax, so this gives the same beams while the
model skips the V-wide output product.
The cache is any pytree whose arrays have the B*K rows leading (row b*K + k is beam k of example
b); the caller prefills the prompt once (all of it but its last token) into a cache of B rows,
and `beam_search` tiles it to B*K. Step 0 feeds the prompt's last token (`start_tokens`), step
l > 0 the token of the code chosen at level l-1, so L levels cost L model calls. A model step
may instead keep the prompt's cache outside the searched cache, read by all K beams in place
(`generator.generate`, `backbone.Decoder(..., shared=)`): the searched cache then holds only
each beam's generated tokens, and tiling and reordering it costs next to nothing.

Scores are sums of per-level log-probabilities. A level's log-probabilities are a log-softmax
over that level's C_l codes; with `renormalize=True` (default) the disallowed codes are masked
first, so each step is a distribution over the allowed children and the beam score of a prefix
is its probability under the constrained model (summing to 1 over all allowed prefixes); with
False the softmax is over all C_l codes and the disallowed ones are removed afterwards.

Fewer than K allowed sequences: the extra beams come back with `valid = False`, score NEG_INF,
codes -1 and prefix id -1 (a beam is invalid as soon as its score falls to NEG_INF, i.e. it had
to take a disallowed code). Callers must read `valid`; scores are finite everywhere.

The final cache holds the prompt and codes 0..L-2 of every beam, not the last code: the `<q>`
pass of SIGMA feeds `[last_tokens, <q>]` (two tokens) on it, which saves a model call.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from sigma_jax.generate.trie import TrieTables
from sigma_jax.numerics import DEAD, NEG_INF

TokensToLogits = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


@flax.struct.dataclass
class BeamState:
  """Loop state of `beam_search` (fixed shapes; B batch, K beams, L levels).

  Attributes:
    step: [] int32, the level decoded next (0..L).
    sequences: [B, K, L] int32 codes of levels < step (0 elsewhere).
    scores: [B, K] float32, sum of log-probs so far; NEG_INF for invalid beams.
    valid: [B, K] bool, the beam is an allowed prefix (False: score NEG_INF). Every SID has
      exactly L codes, so no beam finishes early: all finish together at step L, and `valid`
      is the only per-beam flag needed (the role T5X's finished flags play for EOS).
    node: [B, K] int32 trie node of the prefix at depth `step` (see `trie`), -1 when invalid.
    tokens: [B, K] int32 token fed to the model at this step.
    cache: the model cache pytree, B*K rows leading on every array.
  """
  step: jax.Array
  sequences: jax.Array
  scores: jax.Array
  valid: jax.Array
  node: jax.Array
  tokens: jax.Array
  cache: Any


@flax.struct.dataclass
class BeamResult:
  """Output of `beam_search`, beams sorted by score (best first).

  Attributes:
    sequences: [B, K, L] int32 codes, -1 for invalid beams.
    scores: [B, K] float32 sum of log-probs, NEG_INF for invalid beams.
    valid: [B, K] bool.
    prefix_ids: [B, K] int32 full-catalogue prefix id (`TrieTables.leaf_ids`), -1 if invalid.
    last_tokens: [B, K] int32 token of each beam's last code (not yet in the cache); invalid
      beams get code 0's token so a `<q>` pass over all rows stays in range.
    cache: the cache after codes 0..L-2, B*K rows.
  """
  sequences: jax.Array
  scores: jax.Array
  valid: jax.Array
  prefix_ids: jax.Array
  last_tokens: jax.Array
  cache: Any


def level_token_ids(token_offset, width: int, vocab_size: int) -> jax.Array:
  """Token ids of each level's codes, for a step that returns level logits only.

  Args:
    token_offset: L ints; level l's code c is token token_offset[l] + c.
    width: W = max C_l.
    vocab_size: V; ids past the vocabulary (codes a narrower level does not have) are clipped
      to V - 1, their columns are never allowed.

  Returns:
    [L, W] int32; row l holds token_offset[l] + 0 .. W-1.
  """
  ids = jnp.asarray(token_offset, jnp.int32)[:, None] + jnp.arange(width, dtype=jnp.int32)
  return jnp.minimum(ids, vocab_size - 1)


def _gather_beams(x: jax.Array, parent: jax.Array) -> jax.Array:
  """Rows of the chosen parents. Args: x [B, K, ...], parent [B, K]. Returns [B, K, ...]."""
  idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _level_fns(tables: TrieTables, batch: int, width: int):
  """One function per level: node [B, K] -> (allowed [B, K, W], child [B, K, W]).

  `child` is the node id reached through each code (-1 where not allowed); W = max C_l, the
  codes of a narrower level are padded as disallowed.
  """
  sizes = tables.codebook_sizes
  # Unbatched tables are indexed with row 0 for every example.
  if tables.batched:
    row = jnp.arange(batch)[:, None]  # [B, 1]
    t = tables
  else:
    row = jnp.zeros((batch, 1), jnp.int32)
    t = jax.tree.map(lambda x: x[None], tables)

  def pad(allowed, child):
    extra = width - allowed.shape[-1]
    allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, extra)))
    child = jnp.pad(child, ((0, 0), (0, 0), (0, extra)), constant_values=-1)
    return allowed, child

  def level0(node):
    k = node.shape[1]
    allowed = jnp.broadcast_to(t.mask0[row], (batch, k, sizes[0]))  # [B, K, C0]
    child = jnp.broadcast_to(jnp.arange(sizes[0], dtype=jnp.int32), allowed.shape)
    return pad(allowed & (node >= 0)[..., None], jnp.where(allowed, child, -1))

  def level1(node):
    n = jnp.maximum(node, 0)
    allowed = t.mask1[row, n] & (node >= 0)[..., None]  # [B, K, C1]
    return pad(allowed, jnp.where(allowed, t.node2[row, n], -1))

  def csr_level(i, node):
    # Children of node n are edges indptr[n]..indptr[n+1]-1; edge e leads to node e.
    c = sizes[2 + i]
    ptr, kids = t.indptr[i], t.children[i]  # [1|B, cap + 1], [1|B, cap]
    n = jnp.maximum(node, 0)
    start, end = ptr[row, n], ptr[row, n + 1]  # [B, K]
    edge = start[..., None] + jnp.arange(c, dtype=jnp.int32)  # [B, K, C]
    ok = (edge < end[..., None]) & (node >= 0)[..., None]
    code = kids[row[..., None], jnp.minimum(edge, kids.shape[-1] - 1)]  # [B, K, C]
    # Scatter the children into code slots; slot c (one past the end) takes the misses.
    slot = jnp.where(ok, code, c)
    b = jnp.arange(batch)[:, None, None]
    k = jnp.arange(node.shape[1])[None, :, None]
    allowed = jnp.zeros(node.shape + (c + 1,), bool).at[b, k, slot].set(True)[..., :c]
    child = jnp.full(node.shape + (c + 1,), -1, jnp.int32).at[b, k, slot].set(edge)[..., :c]
    return pad(allowed, child)

  fns = [level0]
  if len(sizes) > 1:
    fns.append(level1)
  fns += [functools.partial(csr_level, i) for i in range(len(sizes) - 2)]
  return fns


def beam_search(tokens_to_logits: TokensToLogits, start_tokens: jax.Array, cache: Any,
                tables: TrieTables, *, num_beams: int, token_offset, renormalize: bool = True,
                level_logits: bool = False) -> BeamResult:
  """Constrained beam search; traceable, call it inside a jitted function.

  Args:
    tokens_to_logits: the model step (module docstring).
    start_tokens: [B] int32, each prompt's last token (not in `cache`).
    cache: model cache pytree with B rows leading (the prompt minus its last token).
    tables: `TrieTables` of the allowed SIDs (unbatched, or batched with B rows).
    num_beams: K.
    token_offset: L ints (static); level l's code c is token `token_offset[l] + c`.
    renormalize: log-softmax over the allowed codes only (module docstring).
    level_logits: the callback returns [B*K, W] level-code logits, not [B*K, V] (module
      docstring).

  Returns:
    `BeamResult`; beams sorted by score, invalid beams last.
  """
  tables = jax.tree.map(jnp.asarray, tables)
  sizes = tables.codebook_sizes
  levels, k_beams = len(sizes), int(num_beams)
  token_offset = tuple(int(o) for o in token_offset)
  if len(token_offset) != levels:
    raise ValueError(f"token_offset has {len(token_offset)} levels, the tables {levels}")
  batch = start_tokens.shape[0]
  width = max(sizes)
  offsets = jnp.asarray(token_offset, jnp.int32)  # [L]
  level_size = jnp.asarray(sizes, jnp.int32)  # [L]
  level_fns = _level_fns(tables, batch, width)
  # Two candidates per beam, so that K live candidates survive whatever the dead ones do.
  num_cand = min(2 * k_beams, k_beams * width)

  tile = lambda x: jnp.repeat(x, k_beams, axis=0)
  # Only beam 0 starts live: K copies of one prompt would otherwise fill the beam with
  # duplicates.
  first = jnp.arange(k_beams) == 0
  init = BeamState(
      step=jnp.zeros((), jnp.int32),
      sequences=jnp.zeros((batch, k_beams, levels), jnp.int32),
      scores=jnp.broadcast_to(jnp.where(first, 0.0, NEG_INF), (batch, k_beams)).astype(
          jnp.float32),
      valid=jnp.broadcast_to(first, (batch, k_beams)),
      node=jnp.zeros((batch, k_beams), jnp.int32),
      tokens=jnp.broadcast_to(start_tokens.astype(jnp.int32)[:, None], (batch, k_beams)),
      cache=jax.tree.map(tile, cache))

  def body(s: BeamState) -> BeamState:
    logits, new_cache = tokens_to_logits(s.tokens.reshape(-1), s.cache, s.step)
    logits = logits.astype(jnp.float32).reshape(batch, k_beams, -1)  # [B, K, V] or [B, K, W]
    if level_logits:
      if logits.shape[-1] != width:
        raise ValueError(f"level_logits: the step returned {logits.shape[-1]} columns, the "
                         f"widest level has {width} codes")
      code_logits = logits  # [B, K, W]
    else:
      short = max(token_offset) + width - logits.shape[-1]
      if short > 0:  # the last levels' slice may run past V
        logits = jnp.pad(logits, ((0, 0), (0, 0), (0, short)), constant_values=NEG_INF)
      code_logits = jax.lax.dynamic_slice_in_dim(logits, offsets[s.step], width, axis=2)
    allowed, child = jax.lax.switch(s.step, level_fns, s.node)  # [B, K, W]
    in_level = jnp.arange(width) < level_size[s.step]  # [W]
    logp = jax.nn.log_softmax(
        jnp.where(allowed if renormalize else in_level, code_logits, NEG_INF), axis=-1)
    # Re-mask: a row with nothing allowed would otherwise be uniform.
    logp = jnp.where(allowed, logp, NEG_INF)  # [B, K, W]
    cand = (s.scores[..., None] + logp).reshape(batch, k_beams * width)  # [B, K*W]
    cand_scores, cand_idx = jax.lax.top_k(cand, num_cand)  # [B, 2K]
    # top_k sorts, and dead candidates (<= NEG_INF) sort behind every live one, so the first
    # K are the K best live candidates whenever K exist.
    scores, idx = cand_scores[:, :k_beams], cand_idx[:, :k_beams]  # [B, K]
    parent, code = idx // width, idx % width
    valid = scores > DEAD
    node = jnp.take_along_axis(child.reshape(batch, -1), idx, axis=1)  # [B, K]
    sequences = _gather_beams(s.sequences, parent)
    sequences = jnp.where(jnp.arange(levels) == s.step, code[..., None], sequences)
    cache = jax.tree.map(
        lambda x: _gather_beams(x.reshape((batch, k_beams) + x.shape[1:]), parent).reshape(
            x.shape), new_cache)
    return BeamState(step=s.step + 1, sequences=sequences,
                     scores=jnp.where(valid, scores, NEG_INF), valid=valid,
                     node=jnp.where(valid, node, -1), tokens=offsets[s.step] + code,
                     cache=cache)

  final = jax.lax.while_loop(lambda s: s.step < levels, body, init)
  valid = final.valid
  leaf_ids = tables.leaf_ids if tables.batched else tables.leaf_ids[None]
  row = jnp.arange(batch)[:, None] if tables.batched else jnp.zeros((batch, 1), jnp.int32)
  prefix_ids = jnp.where(valid, leaf_ids[row, jnp.maximum(final.node, 0)], -1)
  return BeamResult(
      sequences=jnp.where(valid[..., None], final.sequences, -1),
      scores=final.scores, valid=valid, prefix_ids=prefix_ids,
      last_tokens=jnp.where(valid, final.tokens, token_offset[-1]),
      cache=final.cache)


@functools.partial(jax.jit, static_argnames=("step_fn", "num_beams", "token_offset",
                                             "renormalize", "level_logits"))
def constrained_beam_search(step_fn: Callable[..., tuple[jax.Array, Any]], model_state: Any,
                            start_tokens: jax.Array, cache: Any, tables: TrieTables, *,
                            num_beams: int, token_offset: tuple[int, ...],
                            renormalize: bool = True, level_logits: bool = False
                            ) -> BeamResult:
  """Jitted `beam_search` with the model state and the trie tables as ARGUMENTS.

  Compiled once per (step_fn, shapes, static arguments): new tables or new parameters of the
  same shapes reuse the compiled program. `step_fn` is hashed by identity (or its __eq__), so
  pass one long-lived function, not a fresh lambda per call.

  Args:
    step_fn: `step_fn(model_state, tokens [B*K], cache, step) -> (logits [B*K, V], cache)`
      ([B*K, W] with `level_logits`).
    model_state: pytree passed to `step_fn` (e.g. the split model's parameters).
    start_tokens: [B] int32.
    cache: B-row model cache (prompt minus its last token).
    tables: `TrieTables`.
    num_beams: K.
    token_offset: tuple of L ints.
    renormalize, level_logits: see `beam_search`.

  Returns:
    `BeamResult`.
  """
  return beam_search(functools.partial(step_fn, model_state), start_tokens, cache, tables,
                     num_beams=num_beams, token_offset=token_offset, renormalize=renormalize,
                     level_logits=level_logits)
