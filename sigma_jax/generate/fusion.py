"""Bucketed exact retrieval and adaptive probabilistic fusion (APF), DESIGN §1.4 steps 2-3.

After the beam search returns K prefixes with beam scores s_k (log-probs), step 2 scores the
items of each prefix's bucket by cos(h_k, v̂_i) (`bucket_retrieval`), and step 3 fuses the two:

  φ_k                 = exp(s_k)                         sequence probability of prefix k
  P(prefix_k | T)     = φ_k / Σ_j φ_j                    renormalised over the K returned prefixes
  σ                   = std(φ_1, ..., φ_K)               population std (ddof 0) of the raw φ
  P(id_i | T, pre_k)  = softmax_{i in bucket k}(cos(h_k, v̂_i) · σ / τ)
  P(v_i | T)          = P(prefix_k | T) · P(id_i | T, prefix_k)

then a global top-N over the K×M candidates. σ uses the raw (not renormalised) beam
probabilities, as DESIGN writes it: a peaked beam (constrained tasks) has a large σ and sharpens
the item softmax, a flat one smooths it. Invalid beams (beam search `valid` False) are left out
of the normalisation, of σ (std over the valid beams only) and of the candidates. With a single
valid beam σ = 0 and its bucket's items get equal probability; equal probabilities are ordered
by beam, then by cosine. An item belongs to exactly one prefix bucket, so the K×M candidates
contain no duplicates.

With a fixed σ (``fixed_sigma`` > 0, ``generation.apf_fixed_sigma``; the `sigma_fixed_fusion`
ablation) every query uses that constant instead of std(φ): the fusion without its adaptive
part. Only σ/τ enters the item softmax, so sweeping τ at a fixed σ sweeps the constant.

`unfused_rank` is the "without APF" ablation: sort by prefix score, then by cosine.
`apf_reference` is a NumPy transcription of the formula, for tests.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.numerics import DEAD, NEG_INF


@flax.struct.dataclass
class Ranked:
  """A ranked list of N items per example.

  Attributes:
    items: [B, N] int32 item indices, -1 where there are fewer than N candidates.
    scores: [B, N] float32; APF: P(v_i | T) (0 for padding); un-fused: the beam log-prob of the
      item's prefix (NEG_INF for padding).
    beam: [B, N] int32 index k of the prefix the item came from, -1 for padding.
    cos: [B, N] float32 cos(h_k, v̂_i), NEG_INF for padding.
    valid: [B, N] bool.
  """
  items: jax.Array
  scores: jax.Array
  beam: jax.Array
  cos: jax.Array
  valid: jax.Array


def _normalize(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("num_items", "normalize"))
def bucket_retrieval(h: jax.Array, prefix_ids: jax.Array, bucket_table: jax.Array,
                     item_emb: jax.Array, num_items: int,
                     allowed: jax.Array | None = None,
                     normalize: bool = True,
                     item_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact cosine top-M among the items of each prefix's bucket.

  With ``normalize=False`` the score is the dot product of query and key (a model trained with
  ``sft.similarity='dot'``); "cos" below then means that score. With ``item_bias`` [N] each
  item's score is its cosine plus its bias (``generation.item_prior``: λ · log(1 + training
  count)), for the top M and for APF alike; "cos" then means that sum.

  Args:
    h: [B, K, D] query state per prefix (the `<q>` hidden state, projected).
    prefix_ids: [B, K] int bucket of each prefix (beam `prefix_ids`), -1 for an invalid beam.
    bucket_table: [P, Bmax] int item indices per bucket, padded with -1
      (`models.rq.prefix_buckets`).
    item_emb: [N, D] item keys v̂ (normalised here unless ``normalize`` is off).
    num_items: M.
    allowed: optional [B, N] bool, the items each example may return (an instruction's
      constraint). The others are dropped before the top M, so a narrow constraint keeps every
      allowed item of the bucket.

  Returns:
    items [B, K, M] int32 (-1 padding), cos [B, K, M] float32 (NEG_INF padding), each bucket
    sorted by cosine, best first.
  """
  rows = jnp.take(bucket_table, jnp.maximum(prefix_ids, 0), axis=0)  # [B, K, Bmax]
  rows = jnp.where(prefix_ids[..., None] >= 0, rows, -1).astype(jnp.int32)
  if allowed is not None:
    ok = jnp.take_along_axis(allowed[:, None, :], jnp.maximum(rows, 0), axis=2)  # [B, K, Bmax]
    rows = jnp.where(ok, rows, -1)
  if rows.shape[-1] < num_items:
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, num_items - rows.shape[-1])), constant_values=-1)
  keys = jnp.take(item_emb, jnp.maximum(rows, 0), axis=0).astype(jnp.float32)
  h = h.astype(jnp.float32)
  if normalize:
    keys, h = _normalize(keys), _normalize(h)
  cos = jnp.einsum("bkd,bkmd->bkm", h, keys)  # [B, K, Bmax]
  if item_bias is not None:
    cos = cos + jnp.take(item_bias.astype(jnp.float32), jnp.maximum(rows, 0))
  cos = jnp.where(rows >= 0, cos, NEG_INF)
  top_cos, idx = jax.lax.top_k(cos, num_items)  # [B, K, M]
  items = jnp.take_along_axis(rows, idx, axis=-1)
  ok = top_cos > DEAD
  return jnp.where(ok, items, -1), jnp.where(ok, top_cos, NEG_INF)


def apf_terms(scores: jax.Array, valid: jax.Array, cos: jax.Array, items: jax.Array, tau: float,
              fixed_sigma: float = 0.0):
  """The APF factors, per candidate.

  Args:
    scores: [B, K] beam log-probs.
    valid: [B, K] bool beam validity.
    cos: [B, K, M] cosine per candidate item.
    items: [B, K, M] int item indices, -1 padding.
    tau: temperature τ.
    fixed_sigma: > 0: σ for every query (a traced scalar like τ); 0 or less: the adaptive
      std(φ).

  Returns:
    (log P(prefix_k|T) [B, K], σ [B], log P(id_i|T,prefix_k) [B, K, M]); NEG_INF where invalid.
  """
  scores = scores.astype(jnp.float32)
  masked = jnp.where(valid, scores, NEG_INF)
  log_prefix = jnp.where(valid, masked - jax.nn.logsumexp(masked, axis=-1, keepdims=True),
                         NEG_INF)  # [B, K]
  phi = jnp.where(valid, jnp.exp(masked), 0.0)  # [B, K]
  n = jnp.maximum(jnp.sum(valid, axis=-1), 1)  # [B]
  mean = jnp.sum(phi, axis=-1) / n
  sigma = jnp.sqrt(jnp.sum(jnp.where(valid, (phi - mean[:, None]) ** 2, 0.0), axis=-1) / n)
  fixed = jnp.asarray(fixed_sigma, jnp.float32)
  sigma = jnp.where(fixed > 0, jnp.broadcast_to(fixed, sigma.shape), sigma)  # [B]
  ok = (items >= 0) & valid[..., None]  # [B, K, M]
  logits = jnp.where(ok, cos.astype(jnp.float32) * sigma[:, None, None] / tau, NEG_INF)
  log_item = jnp.where(ok, jax.nn.log_softmax(logits, axis=-1), NEG_INF)  # [B, K, M]
  return log_prefix, sigma, log_item


@functools.partial(jax.jit, static_argnames=("top_n",))
def apf_rank(scores: jax.Array, valid: jax.Array, items: jax.Array, cos: jax.Array, tau: float,
             top_n: int, fixed_sigma: float = 0.0) -> Ranked:
  """Adaptive probabilistic fusion and the global top-N (module docstring).

  Args:
    scores: [B, K] beam log-probs (beam search `scores`).
    valid: [B, K] bool.
    items: [B, K, M] int32 candidates per prefix (`bucket_retrieval`), -1 padding.
    cos: [B, K, M] float cosine per candidate.
    tau: τ.
    top_n: N.
    fixed_sigma: > 0: this σ for every query instead of the adaptive one (`apf_terms`).

  Returns:
    `Ranked` with `scores` = P(v_i | T).
  """
  b, k, m = items.shape
  log_prefix, _, log_item = apf_terms(scores, valid, cos, items, tau, fixed_sigma)
  ok = (items >= 0) & valid[..., None]
  log_p = jnp.where(ok, log_prefix[..., None] + log_item, NEG_INF).reshape(b, k * m)
  flat_ok = ok.reshape(b, k * m)
  # Break probability ties (σ = 0) by beam, then cosine: a lexicographic sort on three keys.
  beam_of = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[:, None], (k, m)).reshape(-1)
  neg_cos = jnp.where(ok, -cos, -NEG_INF).reshape(b, k * m)
  pos = jnp.broadcast_to(jnp.arange(k * m, dtype=jnp.int32), (b, k * m))
  _, _, _, order = jax.lax.sort(
      (-log_p, jnp.broadcast_to(beam_of, (b, k * m)), neg_cos, pos), dimension=1, num_keys=3)
  order = order[:, :top_n] if top_n <= k * m else jnp.pad(order, ((0, 0), (0, top_n - k * m)))
  return _ranked(order, flat_ok, log_p, items, cos, k * m, top_n, prob=True)


def _ranked(order, flat_ok, score, items, cos, size, top_n, prob):
  b, k, m = items.shape
  inside = jnp.arange(top_n) < size
  ok = jnp.take_along_axis(flat_ok, order, axis=1) & inside  # [B, N]
  pick = lambda x: jnp.take_along_axis(x.reshape(b, k * m), order, axis=1)
  s = pick(score)
  return Ranked(items=jnp.where(ok, pick(items), -1),
                scores=jnp.where(ok, jnp.exp(s) if prob else s, 0.0 if prob else NEG_INF),
                beam=jnp.where(ok, order // m, -1), cos=jnp.where(ok, pick(cos), NEG_INF),
                valid=ok)


@functools.partial(jax.jit, static_argnames=("top_n",))
def unfused_rank(scores: jax.Array, valid: jax.Array, items: jax.Array, cos: jax.Array,
                 top_n: int) -> Ranked:
  """"Without APF" ablation: every item of a better prefix first, cosine within a prefix.

  Args:
    scores: [B, K] beam log-probs.
    valid: [B, K] bool.
    items: [B, K, M] int32, -1 padding.
    cos: [B, K, M].
    top_n: N.

  Returns:
    `Ranked` with `scores` = the beam log-prob of each item's prefix.
  """
  b, k, m = items.shape
  ok = (items >= 0) & valid[..., None]  # [B, K, M]
  prefix_score = jnp.broadcast_to(jnp.where(valid, scores, NEG_INF)[..., None], (b, k, m))
  # Invalid candidates go last whatever their beam's score.
  key1 = jnp.where(ok, -prefix_score, -NEG_INF).reshape(b, k * m)
  key2 = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (b, k, m)).reshape(
      b, k * m)
  key3 = jnp.where(ok, -cos, -NEG_INF).reshape(b, k * m)
  pos = jnp.broadcast_to(jnp.arange(k * m, dtype=jnp.int32), (b, k * m))
  _, _, _, order = jax.lax.sort((key1, key2, key3, pos), dimension=1, num_keys=3)
  order = order[:, :top_n] if top_n <= k * m else jnp.pad(order, ((0, 0), (0, top_n - k * m)))
  return _ranked(order, ok.reshape(b, k * m), prefix_score, items, cos, k * m, top_n,
                 prob=False)


def apf_reference(scores: np.ndarray, valid: np.ndarray, items: np.ndarray, cos: np.ndarray,
                  tau: float, top_n: int, fixed_sigma: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """NumPy APF, written from the formula with loops (tests compare `apf_rank` to it).

  Args:
    scores: [B, K] beam log-probs; valid: [B, K] bool; items: [B, K, M] (-1 padding);
    cos: [B, K, M]; tau: τ; top_n: N; fixed_sigma: > 0: σ for every query.

  Returns:
    items [B, N] (-1 padding) and P(v_i | T) [B, N] (0 padding), best first.
  """
  b_size, k_size, m_size = items.shape
  out_items = np.full((b_size, top_n), -1, np.int64)
  out_p = np.zeros((b_size, top_n), np.float64)
  for b in range(b_size):
    beams = [k for k in range(k_size) if valid[b, k]]
    phi = {k: np.exp(np.float64(scores[b, k])) for k in beams}
    total = sum(phi.values())
    sigma = np.std([phi[k] for k in beams]) if beams else 0.0
    if fixed_sigma > 0:
      sigma = float(fixed_sigma)
    cands = []
    for k in beams:
      members = [m for m in range(m_size) if items[b, k, m] >= 0]
      z = np.array([cos[b, k, m] * sigma / tau for m in members], np.float64)
      p_item = np.exp(z - z.max()) / np.exp(z - z.max()).sum() if members else z
      for j, m in enumerate(members):
        cands.append((phi[k] / total * p_item[j], -k, cos[b, k, m], items[b, k, m]))
    cands.sort(key=lambda c: (-c[0], -c[1], -c[2]))
    for n, c in enumerate(cands[:top_n]):
      out_items[b, n], out_p[b, n] = c[3], c[0]
  return out_items, out_p
