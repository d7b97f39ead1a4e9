"""SIGMA's recommender: decoder backbone + ProjFuse + `<q>` head, and its SFT loss (DESIGN §1.3).

`L = L_NTP + μ · L_ID`:
- `L_NTP`: cross-entropy of the target's SID prefix tokens (only at positions that predict one);
- `L_ID`: InfoNCE between `normalize(W_q · h_<q>)` and the target's `v̂`, over in-batch
  negatives (every other query's item in the batch) and hard negatives (items that share the
  target's prefix, sampled on the host). Other in-batch copies of the target item are not
  negatives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sigma_jax.models import backbone, grounding, projfuse
from sigma_jax.numerics import NEG_INF


SIMILARITIES = ("cosine", "dot")


class SigmaModel(nnx.Module):
  """Parameters: `backbone` (Decoder over text + SID tokens), `projfuse`, `q_proj` [D, D]
  (embed, None).

  ``similarity``: how a `<q>` query scores an item key — ``'cosine'`` (DESIGN §1.2: both unit
  vectors) or ``'dot'`` (neither normalised, so a key's norm can carry how likely the item is
  overall, as the collab model's dot-product scores do)."""

  def __init__(self, model_cfg, feat_dim: int, projfuse_hidden: int, *, rngs: nnx.Rngs,
               similarity: str = "cosine"):
    if similarity not in SIMILARITIES:
      raise ValueError(f"sft.similarity must be one of {SIMILARITIES}, got {similarity!r}")
    self.similarity = similarity
    self.backbone = backbone.Decoder(model_cfg, rngs=rngs)
    self.projfuse = projfuse.ProjFuse(feat_dim, projfuse_hidden, model_cfg.d_model, rngs=rngs,
                                      normalize=similarity == "cosine")
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None),
                                 eager_sharding=False)
    self.q_proj = nnx.Param(init(rngs.params(), (model_cfg.d_model, model_cfg.d_model),
                                 jnp.float32))

  def item_keys(self, feats: jax.Array) -> jax.Array:
    """v̂ of items from their frozen features: [..., F] -> [..., D] unit vectors."""
    return self.projfuse(feats)

  def hidden(self, tokens, inject_items, attn_mask, feats, cache=None, segment_ids=None,
             branch_ids=None, positions=None):
    """Backbone over a prompt with ProjFuse vectors injected at `<item>` positions.

    Args:
      tokens: [B, T] int32; inject_items [B, T] int32 (-1: no injection); attn_mask [B, T].
      feats: [N, F] frozen item features (all items).
      cache: optional KV cache (prefill).
      segment_ids: optional [B, T] packed-row segments (`backbone.Decoder`).
      branch_ids, positions: optional [B, T] branches sharing a trunk inside a segment and their
        RoPE positions (`backbone.Decoder`).

    Returns:
      hidden [B, T, D] (and the cache when one is given).
    """
    mask = inject_items >= 0
    v = self.projfuse.inject(self.projfuse(feats[jnp.maximum(inject_items, 0)]))  # [B, T, D]
    return self.backbone(tokens, inject=v, inject_mask=mask, attn_mask=attn_mask, cache=cache,
                         segment_ids=segment_ids, branch_ids=branch_ids, positions=positions)

  def query(self, h: jax.Array) -> jax.Array:
    """Retrieval query from `<q>` hidden states: [..., D] -> [..., D] (unit vectors under
    cosine similarity)."""
    q = h @ self.q_proj[...]
    return grounding.l2_normalize(q) if self.similarity == "cosine" else q


def _gather(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [B, T, ...] at positions pos [B, P] -> [B, P, ...]."""
  return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)


ID_NEGATIVES = ("batch", "catalogue")


def sft_loss(model: SigmaModel, batch: dict, feats: jax.Array, mu: float,
             tau: float, negatives: str = "batch") -> tuple[jax.Array, dict]:
  """`L_NTP + μ · L_ID` for one batch.

  L_ID is InfoNCE between the `<q>` state and ProjFuse(target). Its negatives are, with
  ``negatives='batch'`` (DESIGN §1.3), the other targets of the batch plus the hard negatives
  that share the target's prefix; with ``'catalogue'``, every other item (a full softmax over
  the N item keys, as the collab model is trained). The catalogue costs one ProjFuse pass over
  N items and a [B·Q, N] product per step.

  Args:
    batch: tokens, inject_items, attn_mask [B, T]; ntp_pos, ntp_tgt, ntp_w [B, P] (positions
      that predict a prefix token, the token, weight); q_pos, q_item [B, Q] (`<q>` positions and
      their items, -1 padded); hard [B, Q, M] hard-negative items (-1 padded). A packed batch
      (`prompts.pack`) has R rows of several examples each: tokens, inject_items, attn_mask and
      segment_ids are [R, T], the rest stays per example [B, ...] with ntp_pos and q_pos flat
      indices into the R·T tokens; the loss is the same as for the unpacked batch.
    feats: [N, F] frozen item features.
    mu: μ, the weight of L_ID.
    tau: InfoNCE temperature.

  Returns:
    (loss, metrics): `ntp`, `id`, `id_acc` (the target beats every candidate), `ntp_acc`.
  """
  h = model.hidden(batch["tokens"], batch["inject_items"], batch["attn_mask"], feats,
                   segment_ids=batch.get("segment_ids"), branch_ids=batch.get("branch_ids"),
                   positions=batch.get("positions"))
  if "segment_ids" in batch:
    # Packed: [R, T, D] -> [1, R·T, D]; the indices [B, P] are flat, so gather as one row.
    h = h.reshape(1, -1, h.shape[-1])
    gather = lambda x, pos: _gather(x, pos.reshape(1, -1)).reshape(pos.shape + x.shape[2:])
  else:
    gather = _gather
  h_ntp = gather(h, batch["ntp_pos"])  # [B, P, D]
  logits = model.backbone.logits(h_ntp)  # [B, P, V]
  ntp = backbone.lm_loss(logits, batch["ntp_tgt"], batch["ntp_w"])
  ntp_hit = (jnp.argmax(logits, -1) == batch["ntp_tgt"]) * batch["ntp_w"]
  ntp_acc = jnp.sum(ntp_hit) / jnp.maximum(jnp.sum(batch["ntp_w"]), 1.0)

  q = model.query(gather(h, jnp.maximum(batch["q_pos"], 0)))  # [B, Q, D]
  q = q.reshape(-1, q.shape[-1])  # [BQ, D]
  items = batch["q_item"].reshape(-1)  # [BQ]
  valid = items >= 0
  w = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  if negatives == "catalogue":
    scores = (q @ model.item_keys(feats).T) / tau  # [BQ, N]
    labels = jnp.maximum(items, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    id_loss = jnp.sum(ce * w) / n
    id_acc = jnp.sum((jnp.argmax(scores, -1) == labels) * w) / n
    return ntp + mu * id_loss, {"ntp": ntp, "id": id_loss, "id_acc": id_acc, "ntp_acc": ntp_acc}
  if negatives != "batch":
    raise ValueError(f"negatives must be one of {ID_NEGATIVES}, got {negatives!r}")
  keys = model.item_keys(feats[jnp.maximum(items, 0)])  # [BQ, D]
  s_in = (q @ keys.T) / tau  # [BQ, BQ]
  own = jnp.eye(len(items), dtype=bool)
  same = items[:, None] == items[None, :]
  s_in = jnp.where((same & ~own) | ~valid[None, :], NEG_INF, s_in)
  hard = batch["hard"].reshape(len(items), -1)  # [BQ, M]
  hard_keys = model.item_keys(feats[jnp.maximum(hard, 0)])  # [BQ, M, D]
  s_hard = jnp.einsum("qd,qmd->qm", q, hard_keys) / tau
  s_hard = jnp.where((hard < 0) | (hard == items[:, None]), NEG_INF, s_hard)
  scores = jnp.concatenate([s_in, s_hard], axis=1)  # [BQ, BQ + M]
  labels = jnp.arange(len(items))
  ce = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
  id_loss = jnp.sum(ce * w) / n
  id_acc = jnp.sum((jnp.argmax(scores, -1) == labels) * w) / n
  return ntp + mu * id_loss, {"ntp": ntp, "id": id_loss, "id_acc": id_acc, "ntp_acc": ntp_acc}
