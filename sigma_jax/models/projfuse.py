"""ProjFuse (DESIGN §1.2): the unique item embedding `v̂_i = normalize(MLP([v_ID_i ; v_text_i ; …]))`.

A trainable MLP over frozen per-item features. `v̂` is the item's retrieval key (the `<q>`
hidden state is scored against it) and, scaled, the vector injected at the item's placeholder
position in a prompt. It is not a vocabulary entry, so the catalogue can grow without touching
the output softmax.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax import workdir as wd
from sigma_jax.models import grounding
from sigma_jax.models.backbone import dense


def _param(init, names, key, shape):
  return nnx.Param(nnx.with_partitioning(init, names, eager_sharding=False)(key, shape,
                                                                            jnp.float32))


class ProjFuse(nnx.Module):
  """Parameters: `w1` [F, H] (None, mlp), `b1` [H] (mlp), `w2` [H, D] (mlp, embed), `b2` [D]
  (embed), `inject_scale` [] — the norm of an injected vector, started at the typical norm of a
  token embedding so injected and token inputs enter the residual stream at the same scale.

  ``normalize=False`` keeps the MLP output's norm in the retrieval key (dot-product retrieval,
  ``sft.similarity='dot'``); the injected vector is unit-norm times ``inject_scale`` either way."""

  def __init__(self, in_dim: int, hidden: int, d_model: int, *, rngs: nnx.Rngs,
               token_init_std: float = 0.02, normalize: bool = True):
    self.normalize = normalize
    lecun = nnx.initializers.lecun_normal()
    zeros = nnx.initializers.zeros_init()
    self.w1 = _param(lecun, (None, "mlp"), rngs.params(), (in_dim, hidden))
    self.b1 = _param(zeros, ("mlp",), rngs.params(), (hidden,))
    self.w2 = _param(lecun, ("mlp", "embed"), rngs.params(), (hidden, d_model))
    self.b2 = _param(zeros, ("embed",), rngs.params(), (d_model,))
    self.inject_scale = nnx.Param(jnp.asarray(token_init_std * np.sqrt(d_model), jnp.float32))

  def __call__(self, feats: jax.Array) -> jax.Array:
    """Args: feats [..., F] frozen item features. Returns: v̂ [..., D], unit norm (unless
    ``normalize`` is off)."""
    h = jax.nn.silu(dense(feats, self.w1[...]) + self.b1[...])
    v = dense(h, self.w2[...]) + self.b2[...]
    return grounding.l2_normalize(v) if self.normalize else v

  def inject(self, v_hat: jax.Array) -> jax.Array:
    """The vector written into the prompt at an item placeholder: [..., D]."""
    v = v_hat if self.normalize else grounding.l2_normalize(v_hat)
    return v * self.inject_scale[...]


TEXT_FEATURES = {"grounded": wd.GROUND_TEXT_EMB, "raw": wd.GROUND_RAW_EMB}


def item_features(workdir: str, extra: str = "", text: str = "grounded") -> np.ndarray:
  """[N, F] frozen features: unit `v_ID` (collab), the unit item text embedding (``text``:
  "grounded", the ground stage's, or "raw", its un-grounded TF-IDF + PCA one) and any extra
  modality matrices named in ``extra`` (comma-separated .npy paths, each [N, d])."""
  if text not in TEXT_FEATURES:
    raise ValueError(f"sft.text_features must be one of {sorted(TEXT_FEATURES)}, got {text!r}")
  paths = [wd.path(workdir, wd.COLLAB_ITEM_EMB), wd.path(workdir, TEXT_FEATURES[text])]
  paths += [p.strip() for p in extra.split(",") if p.strip()]
  mats = []
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"ProjFuse feature matrix {p} is missing")
    m = np.load(p).astype(np.float32)
    if m.ndim != 2 or (mats and len(m) != len(mats[0])):
      raise ValueError(f"{p} has shape {m.shape}; every feature matrix must be [N, d] with the "
                       f"same N ({len(mats[0]) if mats else '?'})")
    mats.append(m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-8))
  return np.concatenate(mats, axis=1)
