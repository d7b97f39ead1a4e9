"""Dual-tower alignment encoder (DESIGN §1.1): text tower, frozen ID tower, L_CL + λ·L_KD."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax.models import backbone
from sigma_jax.numerics import NEG_INF


class TextTower(nnx.Module):
  """`v_text = normalize(W_down · h_last)`: backbone over item text, last-token pooling.

  Parameters: `backbone` (a `backbone.Decoder`), `down` [D, E] (embed, None).
  """

  def __init__(self, model_cfg, out_dim: int, *, rngs: nnx.Rngs):
    self.backbone = backbone.Decoder(model_cfg, rngs=rngs)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None),
                                 eager_sharding=False)  # placed by parallel.init_sharded
    self.down = nnx.Param(init(rngs.params(), (model_cfg.d_model, out_dim), jnp.float32))

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Args: tokens [B, T] int32, mask [B, T] bool. Returns: [B, E] unit vectors."""
    hidden = self.backbone(tokens, attn_mask=mask)  # [B, T, D]
    pooled = backbone.last_token_pool(hidden, mask)  # [B, D]
    return l2_normalize(pooled @ self.down[...])


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def grounding_loss(v_text: jax.Array, v_id: jax.Array, items: jax.Array, tau: float,
                   kd_weight: float) -> tuple[jax.Array, dict]:
  """`L_CL + λ_KD · L_KD` over a batch of B pairs laid out as [anchors; positives].

  L_CL = -1/(2B) Σ_a log softmax_j(sim(v_text_a, v_text_j)/τ)[a+]  (symmetric InfoNCE; j ≠ a)
  L_KD = Σ_a KL(P_ID(·|a) || P_text(·|a)),  P_x(j|a) = softmax_{j≠a}(sim(v_x_a, v_x_j)/τ)

  In L_CL, other in-batch copies of the anchor's own item are left out of the denominator: they
  are not negatives. L_KD is a sum over anchors, as in DESIGN §1.1 (so λ_KD's scale depends on B).

  Args:
    v_text: [2B, E] unit text embeddings; rows b and b+B are a relevance pair.
    v_id: [2B, F] unit ID embeddings of the same items.
    items: [2B] item indices (to find duplicates).
    tau: temperature.
    kd_weight: λ_KD.

  Returns:
    (loss, metrics) with the parts `cl`, `kd` and the in-batch pair accuracy `acc`.
  """
  n = v_text.shape[0]
  b = n // 2
  eye = jnp.eye(n, dtype=bool)
  pos = jnp.concatenate([jnp.arange(b, n), jnp.arange(0, b)])  # [2B]
  is_pos = jax.nn.one_hot(pos, n, dtype=bool)  # [2B, 2B]
  same_item = items[:, None] == items[None, :]
  s_text = (v_text @ v_text.T) / tau  # [2B, 2B]
  cl_logits = jnp.where((same_item | eye) & ~is_pos, NEG_INF, s_text)
  log_p = jax.nn.log_softmax(cl_logits, axis=-1)
  cl = -jnp.mean(jnp.sum(jnp.where(is_pos, log_p, 0.0), axis=-1))

  s_id = (v_id @ v_id.T) / tau
  log_p_id = jax.nn.log_softmax(jnp.where(eye, NEG_INF, s_id), axis=-1)
  log_p_text = jax.nn.log_softmax(jnp.where(eye, NEG_INF, s_text), axis=-1)
  p_id = jnp.exp(log_p_id)
  kd = jnp.sum(jnp.where(eye, 0.0, p_id * (log_p_id - log_p_text)))
  acc = jnp.mean(jnp.argmax(cl_logits, axis=-1) == pos)
  return cl + kd_weight * kd, {"cl": cl, "kd": kd, "acc": acc}


def raw_text_embeddings(token_ids: np.ndarray, mask: np.ndarray, vocab_size: int,
                        dim: int) -> np.ndarray:
  """Un-grounded text embeddings: TF-IDF over text tokens, reduced to `dim` by PCA, unit norm.

  Deterministic (fixed projection seed).

  The `sigma_no_grounding` ablation tokenizes these, and they are the 'before grounding'
  reference of the grounding report.

  Args:
    token_ids: [N, T] SentencePiece ids; mask [N, T] bool.

  Returns:
    [N, dim] float32.
  """
  n = len(token_ids)
  counts = np.zeros((n, vocab_size), np.float32)
  rows = np.repeat(np.arange(n), mask.sum(1))
  np.add.at(counts, (rows, token_ids[mask]), 1.0)
  df = (counts > 0).sum(0)
  tfidf = np.log1p(counts) * np.log((1 + n) / (1 + df))[None, :]
  tfidf /= np.linalg.norm(tfidf, axis=1, keepdims=True) + 1e-8
  centered = tfidf - tfidf.mean(0, keepdims=True)
  # Randomized PCA (two power iterations): exact enough for the top components, and it never
  # forms the [V, V] covariance.
  rng = np.random.default_rng(0)
  q = np.linalg.qr(centered @ rng.standard_normal((vocab_size, dim + 16)).astype(np.float32))[0]
  for _ in range(2):
    q = np.linalg.qr(centered @ (centered.T @ q))[0]
  _, _, vt = np.linalg.svd(q.T @ centered, full_matrices=False)
  proj = centered @ vt[:dim].T
  return (proj / (np.linalg.norm(proj, axis=1, keepdims=True) + 1e-8)).astype(np.float32)


def pair_recall_at_k(emb: np.ndarray, pairs: np.ndarray, k: int = 10,
                     chunk: int = 2048) -> float:
  """Recall@k of retrieving each pair's partner from its anchor among all other items (cosine)."""
  emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-8)
  hits = 0
  for s in range(0, len(pairs), chunk):
    p = pairs[s:s + chunk]
    scores = emb[p[:, 0]] @ emb.T  # [c, N]
    scores[np.arange(len(p)), p[:, 0]] = -np.inf
    target = scores[np.arange(len(p)), p[:, 1]]
    rank = (scores > target[:, None]).sum(1)
    hits += int((rank < k).sum())
  return hits / max(1, len(pairs))
