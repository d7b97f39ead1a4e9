"""SIGMA's three-step generation as one jitted program per mode (DESIGN §1.4).

`sigma`: (1) trie-constrained beam search over the ℓ-token SID prefix → K prefixes with beam
scores; (2) `<q>` fed after each prefix on the KV cache, its hidden state scored by cosine
against the items of that prefix's bucket, top M; (3) APF, then a global top-N (or the un-fused
ranking for the ablation). `gr_sid`: beam search over the full SID (with the de-duplication
level) on per-example tries of the allowed items (history excluded inside the decoder), each
code sequence mapped back to its one item. `gr_id`: `<q>` right after the prompt, exact top-N
over all items.

Prompts end with `<|end|> <|start|>` (`data.prompts.build_prompt(..., target=None)`): the prompt
minus that last `<|start|>` is prefilled into the cache once; the beam search feeds `<|start|>`
first. The K beams of a prompt share its prefilled cache (never tiled or reordered); each
beam's own cache holds the tokens after the prompt, and each step computes only the current
level's code logits (`Decoder.token_logits`), not all V. Constraint tables, bucket tables and
item keys are ARGUMENTS of the jitted function, so a new catalogue or instruction of the same
shapes does not recompile.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax import parallel
from sigma_jax.data import prompts, text
from sigma_jax.generate import beam, fusion, trie
from sigma_jax.models import backbone as bb
from sigma_jax.models import rq
from sigma_jax.numerics import DEAD, NEG_INF


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static decoding settings (hashable: they select a compiled program)."""
  mode: str
  num_beams: int
  top_m: int
  top_n: int
  token_offset: tuple
  fuse: bool  # APF (True) or the un-fused ablation ranking
  query_token: int
  normalize: bool = True  # cosine retrieval (the model's `similarity`); False: dot product


def _cache_len(prompt_len: int, levels: int) -> int:
  return prompt_len + levels + 2


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def generate(graphdef, params, item_keys, tokens, inject_items, attn_mask, feats, tables,
             bucket_table, allowed, tau, fixed_sigma=0.0, item_bias=None, *,
             spec: DecodeSpec) -> fusion.Ranked:
  """Top-N items for a batch of prompts.

  Args:
    graphdef, params: the split `SigmaModel`.
    item_keys: [N, D] v̂ of every item (`SigmaModel.item_keys(feats)`, computed once).
    tokens, inject_items, attn_mask: [B, T] right-padded prompts ending with <|end|><|start|>.
    feats: [N, F] frozen item features (for the injected history items).
    tables: `TrieTables` (batched [B, ...] for per-example constraints), unused in gr_id.
    bucket_table: [P, Bmax] items per prefix id (-1 padded).
    allowed: [B, N] bool items each example may return: the instruction's constraint, minus the
      history items when they are excluded (all True otherwise). In `gr_sid` the tries hold all
      of it (`Generator.recommend`), so every beam ends on an allowed item; a beam that decodes
      a disallowed one anyway (tables built from less) is dropped.
    tau: APF temperature τ (a traced scalar: sweeping it does not recompile).
    fixed_sigma: > 0: APF's σ for every query instead of the adaptive one (traced, like τ).
    item_bias: optional [N] added to every item's retrieval score (`generation.item_prior`);
      an argument, so another weight does not recompile. Unused in gr_sid.
    spec: `DecodeSpec`.

  Returns:
    `fusion.Ranked` [B, N_top].
  """
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  length = jnp.sum(attn_mask, axis=1)  # [B]
  last = jnp.arange(t)[None, :] == (length - 1)[:, None]  # the final <|start|>
  levels = len(spec.token_offset)
  cache = model.backbone.init_cache(b, _cache_len(t, levels))
  _, cache = model.hidden(tokens, inject_items, attn_mask & ~last, feats, cache=cache)
  start = jnp.take_along_axis(tokens, (length - 1)[:, None], axis=1)[:, 0]  # [B]

  # The beams share their prompt's cache (B rows, never tiled or reordered); each beam's own
  # cache holds only the tokens fed after the prompt (the search tiles and reorders it).
  prompt_cache = cache.truncate(t)

  def step(tok, c, level):
    # Only level `level`'s code logits: the search log-softmaxes over them alone.
    h, c = model.backbone(tok[:, None], cache=c, decode=True, shared=prompt_cache)  # [BK,1,D]
    return model.backbone.token_logits(h, code_ids[level])[:, 0], c  # [B*K, W]

  if spec.mode == "gr_id":
    q_in = jnp.stack([start, jnp.full_like(start, spec.query_token)], axis=1)  # [B, 2]
    h, _ = model.backbone(q_in, cache=cache)
    q = model.query(h[:, 1])  # [B, D]
    cos = q @ item_keys.T  # [B, N]
    if item_bias is not None:
      cos = cos + item_bias[None, :]
    cos = jnp.where(allowed, cos, NEG_INF)
    top, items = jax.lax.top_k(cos, spec.top_n)
    ok = top > DEAD
    return fusion.Ranked(items=jnp.where(ok, items, -1).astype(jnp.int32),
                         scores=jnp.where(ok, top, NEG_INF), beam=jnp.where(ok, 0, -1),
                         cos=jnp.where(ok, top, NEG_INF), valid=ok)

  code_ids = beam.level_token_ids(spec.token_offset, max(tables.codebook_sizes),
                                  model.backbone.embedding[...].shape[0])  # [L, W]
  own = bb.beam_cache(prompt_cache, _cache_len(t, levels) - t)  # [B, L + 2] slots
  res = beam.beam_search(step, start, own, tables, num_beams=spec.num_beams,
                         token_offset=spec.token_offset, level_logits=True)
  k = spec.num_beams
  if spec.mode == "gr_sid":
    # Every full SID names one item: its bucket holds exactly that item. The tries already
    # exclude disallowed items; should a beam still end on one, it drops out (a safety net).
    items = jnp.where(res.valid, bucket_table[jnp.maximum(res.prefix_ids, 0), 0], -1)
    ok = res.valid & (items >= 0)
    ok = ok & jnp.take_along_axis(allowed, jnp.maximum(items, 0), axis=1)
    top, pos = jax.lax.top_k(jnp.where(ok, res.scores, NEG_INF), min(spec.top_n, k))
    ok = jnp.take_along_axis(ok, pos, axis=1)
    return fusion.Ranked(items=jnp.where(ok, jnp.take_along_axis(items, pos, axis=1), -1),
                         scores=jnp.where(ok, top, NEG_INF), beam=jnp.where(ok, pos, -1),
                         cos=jnp.zeros_like(top), valid=ok)

  # sigma: <q> after each prefix, on the beams' caches (they hold all codes but the last).
  q_in = jnp.stack([res.last_tokens.reshape(-1),
                    jnp.full((b * k,), spec.query_token, jnp.int32)], axis=1)  # [BK, 2]
  h, _ = model.backbone(q_in, cache=res.cache, shared=prompt_cache)
  q = model.query(h[:, 1]).reshape(b, k, -1)  # [B, K, D]
  # Items of a prefix bucket that break the instruction's constraint never reach the ranking.
  cand, cos = fusion.bucket_retrieval(q, res.prefix_ids, bucket_table, item_keys, spec.top_m,
                                      allowed, normalize=spec.normalize, item_bias=item_bias)
  if spec.fuse:
    return fusion.apf_rank(res.scores, res.valid, cand, cos, tau, spec.top_n, fixed_sigma)
  return fusion.unfused_rank(res.scores, res.valid, cand, cos, spec.top_n)


def trim_prompts(arrays: dict, bucket: int) -> dict:
  """Right-padded [B, T] prompt arrays cut to the batch's longest prompt, rounded up to a
  multiple of ``bucket`` (at most T; ``bucket`` 0: unchanged).

  Only padding is cut: it is masked out of attention and RoPE positions count real tokens, so
  the ranking does not change, while the prefill and the cache shrink with the real prompts.
  """
  t = arrays["tokens"].shape[1]
  if bucket <= 0:
    return arrays
  longest = int(np.asarray(arrays["attn_mask"]).sum(axis=1).max(initial=1))
  cut = min(t, -(-longest // bucket) * bucket)
  return {k: v[:, :cut] if np.ndim(v) == 2 and v.shape[1] == t else v
          for k, v in arrays.items()}


def item_prior_bias(weight: float, item_counts: np.ndarray | None, num_items: int) -> np.ndarray:
  """[N] float32 λ · log(1 + n_i), the popularity prior added to each item's retrieval score
  (``generation.item_prior`` = λ; n_i: item i's training interactions). Zeros when λ is 0.

  Raises:
    ValueError: λ is not 0 and ``item_counts`` is missing or not one count per item.
  """
  weight = float(weight)
  if weight == 0.0:
    return np.zeros((num_items,), np.float32)
  if item_counts is None or np.shape(item_counts) != (num_items,):
    got = "none" if item_counts is None else f"shape {np.shape(item_counts)}"
    raise ValueError(f"generation.item_prior={weight} needs one training count per item "
                     f"({num_items}); got {got}")
  counts = np.asarray(item_counts, np.float64)
  if (counts < 0).any():
    raise ValueError("item counts must be >= 0")
  return (weight * np.log1p(counts)).astype(np.float32)


class Generator:
  """Host-side wrapper: builds tables once, batches prompts, calls `generate`."""

  def __init__(self, cfg, assets, graphdef, params, *, mode: str | None = None,
               fuse: bool | None = None, exclude_history: bool | None = None,
               item_counts: np.ndarray | None = None):
    """``item_counts`` [N]: training interactions per item, needed (and used) only when
    ``generation.item_prior`` is not 0."""
    g = cfg.generation
    self.exclude_history = bool(cfg.dataset.exclude_history
                                if exclude_history is None else exclude_history)
    self.cfg, self.assets, self.graphdef, self.params = cfg, assets, graphdef, params
    self.mode = mode or assets.mode
    levels = int(cfg.tokenizer.levels)
    size = int(cfg.tokenizer.codebook_size)
    sids = assets.sids
    tok = assets.tok
    if self.mode == "sigma":
      self.codes = sids[:, :int(cfg.tokenizer.prefix_len)]
      self.bucket_table = assets.bucket_table
    elif self.mode == "gr_sid":
      self.codes = sids
      _, self.bucket_table, _, _ = rq.prefix_buckets(sids, sids.shape[1])
    else:
      self.codes = np.zeros((len(sids), 0), np.int32)
      self.bucket_table = assets.bucket_table
    self.sizes = tuple([size] * min(self.codes.shape[1], levels) +
                       [tok.dedup_size] * max(0, self.codes.shape[1] - levels))
    offsets = tuple(int(tok.sid_token(lv, 0)) for lv in range(self.codes.shape[1]))
    num_beams = int(g.num_beams)
    model = nnx.merge(graphdef, params)
    self.spec = DecodeSpec(mode=self.mode, num_beams=num_beams, top_m=int(g.top_m),
                           top_n=int(g.top_n), token_offset=offsets,
                           fuse=bool(g.fuse if fuse is None else fuse),
                           query_token=tok.special[text.QUERY],
                           normalize=model.similarity == "cosine")
    self.full_tables = (trie.build_tables(self.codes, self.sizes) if self.codes.shape[1]
                        else None)
    # Multi-process: host arrays go in as global replicated arrays on the parameters' mesh;
    # every process then computes (and agrees on) the same recommendations.
    sharding = jax.tree.leaves(params)[0].sharding
    self._mesh = (sharding.mesh if jax.process_count() > 1
                  and isinstance(sharding, jax.sharding.NamedSharding) else None)
    self.feats = self._put(np.asarray(assets.feats))
    self.item_keys = jax.jit(model.item_keys)(self.feats)
    self.bucket_table = self._put(np.asarray(self.bucket_table))
    # No prior (λ = 0): no bias argument, so decoding does no per-candidate gather for it.
    prior = float(g.get("item_prior", 0.0))
    self.item_bias = (self._put(item_prior_bias(prior, item_counts, len(sids))) if prior
                      else None)
    if self.full_tables is not None:
      self.full_tables = self._put(self.full_tables)

  def _put(self, x):
    """Host arrays as arguments of `generate`: as they are, or replicated over the mesh."""
    if self._mesh is None:
      return x
    return parallel.put_replicated(jax.device_get(x), self._mesh)

  def tables_for(self, allowed: np.ndarray | None):
    """Full-catalogue tables, or per-example subset tables when `allowed` [B, N] is given."""
    if self.full_tables is None:
      return None
    if allowed is None or allowed.all():
      return self.full_tables
    return trie.stack_tables([trie.subset_tables(self.codes, self.sizes, np.flatnonzero(a))
                              for a in allowed])

  def prompts(self, histories, instructions) -> dict:
    a = self.assets
    ex = [prompts.build_prompt(a.spec, h, a.tok.encode(i) if isinstance(i, str) else i, None,
                               verb_ids=a.verb_ids) for h, i in zip(histories, instructions)]
    return prompts.stack(ex)

  def recommend(self, histories, instructions, allowed: np.ndarray | None = None,
                tau: float | None = None) -> fusion.Ranked:
    """Ranked items for each (history, instruction); `allowed` [B, N] constrains the result.

    With `exclude_history` (default `cfg.dataset.exclude_history`) no history item is returned.
    """
    n = len(self.assets.sids)
    arrays = trim_prompts(self.prompts(histories, instructions),
                          int(self.cfg.generation.get("prompt_bucket", 0)))
    b = len(arrays["tokens"])
    constraint = np.ones((b, n), bool) if allowed is None else np.asarray(allowed, bool)
    if not constraint.any(axis=1).all():
      raise ValueError("an example allows no item at all: its constraint matches nothing")
    mask = constraint
    if self.exclude_history:
      mask = constraint.copy()
      for r, h in enumerate(histories):
        h = np.asarray(h, np.int64)
        mask[r, h[(h >= 0) & (h < n)]] = False
    if self.mode == "gr_sid":
      # A full SID is one item: the tries hold everything `mask` allows (constraint and history
      # exclusion), so the search never spends a beam on an excluded item and lists come back
      # full whenever top_n allowed items exist.
      if not mask.any(axis=1).all():
        raise ValueError("an example allows no item at all once its history is excluded")
      tables = self.tables_for(mask)
    else:
      # The tries hold the instruction's constraint only (a prefix bucket holds many items);
      # history exclusion acts on the items of the buckets.
      tables = self.tables_for(None if allowed is None else constraint)
    tau = float(self.cfg.generation.apf_tau if tau is None else tau)
    if tables is not self.full_tables:
      tables = self._put(tables)
    put = self._put
    out = generate(self.graphdef, self.params, self.item_keys, put(arrays["tokens"]),
                   put(arrays["inject_items"]), put(arrays["attn_mask"]), self.feats, tables,
                   self.bucket_table, put(mask), tau,
                   float(self.cfg.generation.apf_fixed_sigma), self.item_bias, spec=self.spec)
    return jax.device_get(out)
