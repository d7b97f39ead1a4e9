"""Residual quantisation of item embeddings into semantic IDs (DESIGN §1.2).

Two quantisers give the same output, an [N, L] int32 code matrix (one code in [0, C) per level):
- `rq_kmeans`: residual k-means, training-free; level l clusters the residuals left by levels
  < l.
- `train_rqvae`: an RQ-VAE (encoder MLP -> latent, L codebooks, straight-through estimator,
  codebook + commitment loss, decoder MLP), codebooks initialised by residual k-means on the
  encoded items, dead codes reset to residuals of random items.

Then `deduplicate` appends a final level so every full SID is distinct (`gr_sid` mode),
`prefix_buckets` groups items by their length-ℓ SID prefix (the vocabulary the backbone
generates, and the buckets retrieval scores exactly), and `tokenizer_report` summarises both.
`tokenize_items` runs the whole thing from `config.tokenizer`.

Every quantiser needs N >= C: with fewer items than codes a codebook cannot be fitted (k-means
has no C distinct seeds) and the caller almost certainly set `codebook_size` for a different
catalogue, so it is a ValueError rather than a silently smaller codebook.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# Fields of `config.tokenizer` read here beyond kind/levels/codebook_size/prefix_len/dedup, with
# the value used when a config does not set them.
TOKENIZER_DEFAULTS = dict(
    kmeans_iters=50,
    kmeans_init="kmeans++",  # kmeans++ | random
)
RQVAE_DEFAULTS = dict(
    hidden_dims=(256, 128),
    latent_dim=32,
    epochs=100,
    batch_size=256,
    learning_rate=1e-3,
    beta=0.25,
    codebook_init="kmeans",  # kmeans | random
    init_scale=1.0,  # std of codebook entries when codebook_init == 'random'
    dead_code_threshold=1,  # a code used by fewer items than this over a window is dead
    reset_every=1,  # window, in epochs, over which usage is counted
)


# ---------------------------------------------------------------------------------------------
# k-means in JAX


def _sq_dists(x, c):
  """Squared Euclidean distances [N, C] between rows of x [N, D] and c [C, D]."""
  d = (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :])
  return jnp.maximum(d, 0.0)  # [N, C]; rounding can make it slightly negative


def _kmeanspp_init(key, x, k):
  """k-means++ seeding: each new centre drawn with probability ∝ squared distance to the
  nearest centre already chosen."""
  n = x.shape[0]
  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
  cent = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])  # [C, D]
  min_d2 = jnp.sum((x - x[first]) ** 2, -1)  # [N]

  def body(i, carry):
    cent, min_d2 = carry
    total = jnp.sum(min_d2)
    # When every point already coincides with a centre all weights are 0; draw uniformly then
    # (the duplicate centre is re-seeded by Lloyd's empty-cluster rule).
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(min_d2, 1e-30)), 0.0)
    logits = jnp.where((total > 0) & (min_d2 <= 0), -jnp.inf, logits)
    idx = jax.random.categorical(jax.random.fold_in(key, i), logits)
    cent = cent.at[i].set(x[idx])
    min_d2 = jnp.minimum(min_d2, jnp.sum((x - x[idx]) ** 2, -1))
    return cent, min_d2

  cent, _ = jax.lax.fori_loop(1, k, body, (cent, min_d2))
  return cent


@functools.partial(jax.jit, static_argnames=("k", "iters", "init"))
def _kmeans(key, x, *, k: int, iters: int, init: str):
  """Lloyd's algorithm; returns (centroids [C, D], assignment [N] int32).

  Clusters left empty by an iteration are re-seeded, each with a distinct point among the C
  farthest from their current centre, so no code stays dead through k-means itself.
  """
  if init == "kmeans++":
    cent = _kmeanspp_init(key, x, k)
  elif init == "random":
    cent = x[jax.random.choice(key, x.shape[0], (k,), replace=False)]
  else:
    raise ValueError(f"unknown k-means init {init!r}; choose 'kmeans++' or 'random'")

  def step(_, cent):
    d2 = _sq_dists(x, cent)  # [N, C]
    assign = jnp.argmin(d2, -1)  # [N]
    onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)  # [N, C]
    counts = onehot.sum(0)  # [C]
    means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]  # [C, D]
    empty = counts == 0
    far = jax.lax.top_k(jnp.take_along_axis(d2, assign[:, None], 1)[:, 0], k)[1]  # [C]
    rank = jnp.cumsum(empty) - 1  # the r-th empty cluster takes the r-th farthest point
    return jnp.where(empty[:, None], x[far[jnp.clip(rank, 0, k - 1)]], means)

  cent = jax.lax.fori_loop(0, iters, step, cent)
  assign = jnp.argmin(_sq_dists(x, cent), -1).astype(jnp.int32)
  return cent, assign


def _check_sizes(n: int, codebook_size: int, levels: int):
  if levels < 1:
    raise ValueError(f"levels must be >= 1, got {levels}")
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
  if n < codebook_size:
    raise ValueError(
        f"cannot fit a codebook of {codebook_size} codes to {n} items (need N >= C); "
        "lower tokenizer.codebook_size")


def rq_kmeans(x: np.ndarray, levels: int, codebook_size: int, *, iters: int = 50,
              seed: int = 0, init: str = "kmeans++"):
  """Residual k-means: level l runs k-means on what levels < l left unexplained.

  Args:
    x: [N, D] float32 item embeddings.
    levels: L, number of code levels.
    codebook_size: C, codes per level; must be <= N (ValueError otherwise).
    iters: Lloyd iterations per level.
    seed: PRNG seed; equal seeds give equal codes.
    init: 'kmeans++' or 'random' (C distinct items).

  Returns:
    codes: [N, L] int32 numpy array.
    codebooks: L numpy arrays [C, D] float32.
  """
  x = np.asarray(x, np.float32)
  _check_sizes(x.shape[0], codebook_size, levels)
  codes, codebooks = _rq_kmeans_jax(jnp.asarray(x), levels, codebook_size, iters,
                                    jax.random.key(seed), init)
  return np.asarray(codes), [np.asarray(c) for c in codebooks]


def _rq_kmeans_jax(x, levels, codebook_size, iters, key, init):
  resid = x  # [N, D]
  codes, codebooks = [], []
  for level in range(levels):
    cent, assign = _kmeans(jax.random.fold_in(key, level), resid, k=codebook_size,
                           iters=iters, init=init)
    resid = resid - cent[assign]
    codes.append(assign)
    codebooks.append(cent)
  return jnp.stack(codes, 1), codebooks  # [N, L], L x [C, D]


def residual_norms(x: np.ndarray, codes: np.ndarray, codebooks: Sequence[np.ndarray]) -> list:
  """Mean residual norm before any level and after each level.

  Args:
    x: [N, D] the vectors that were quantised (embeddings for RQ-KMeans, latents for RQ-VAE).
    codes: [N, L] int.
    codebooks: L arrays [C, D].

  Returns:
    L + 1 floats: mean ||x||, then mean ||x - Σ_{l'<=l} codebook_l'[code_l']|| for l = 0..L-1.
  """
  resid = np.asarray(x, np.float64)
  out = [float(np.linalg.norm(resid, axis=-1).mean())]
  for level, cb in enumerate(codebooks):
    resid = resid - np.asarray(cb, np.float64)[codes[:, level]]
    out.append(float(np.linalg.norm(resid, axis=-1).mean()))
  return out


# ---------------------------------------------------------------------------------------------
# RQ-VAE


class MLP(nnx.Module):
  """Linear layers with SiLU between them (none after the last)."""

  def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs):
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.silu(x)
    return x


def residual_quantize(z, codebooks):
  """Residual quantisation of latents with per-level VQ losses.

  The residual passed to level l + 1 subtracts the *stopped* code of level l, so codebook l is
  trained only by its own codebook loss while the encoder receives every level's commitment
  gradient.

  Args:
    z: [B, Dz] latents.
    codebooks: [L, C, Dz].

  Returns:
    z_q: [B, Dz] sum of the chosen codes, with a straight-through gradient to z.
    codes: [B, L] int32.
    codebook_loss: scalar, Σ_l mean ||sg(r_l) - e_l||².
    commit_loss: scalar, Σ_l mean ||r_l - sg(e_l)||² (not yet multiplied by beta).
    norms: [L + 1] mean residual norm before the first level and after each level.
  """
  resid = z
  quant = jnp.zeros_like(z)
  codes, cb_loss, commit_loss = [], 0.0, 0.0
  norms = [jnp.linalg.norm(resid, axis=-1).mean()]
  for level in range(codebooks.shape[0]):
    cb = codebooks[level]  # [C, Dz]
    idx = jnp.argmin(_sq_dists(jax.lax.stop_gradient(resid), cb), -1)  # [B]
    e = cb[idx]  # [B, Dz]
    cb_loss += jnp.mean(jnp.sum((jax.lax.stop_gradient(resid) - e) ** 2, -1))
    commit_loss += jnp.mean(jnp.sum((resid - jax.lax.stop_gradient(e)) ** 2, -1))
    quant = quant + e
    resid = resid - jax.lax.stop_gradient(e)
    codes.append(idx.astype(jnp.int32))
    norms.append(jnp.linalg.norm(resid, axis=-1).mean())
  z_q = z + jax.lax.stop_gradient(quant - z)  # straight-through: forward z_q, backward identity
  return z_q, jnp.stack(codes, 1), cb_loss, commit_loss, jnp.stack(norms)


class RQVAE(nnx.Module):
  """Encoder MLP -> residual quantiser with L codebooks of C codes -> decoder MLP.

  Attributes:
    encoder: D -> hidden_dims -> Dz.
    codebooks: Param [L, C, Dz].
    decoder: Dz -> reversed(hidden_dims) -> D.
  """

  def __init__(self, in_dim: int, hidden_dims: Sequence[int], latent_dim: int, levels: int,
               codebook_size: int, *, rngs: nnx.Rngs, init_scale: float = 1.0):
    hidden = list(hidden_dims)
    self.encoder = MLP([in_dim, *hidden, latent_dim], rngs=rngs)
    self.decoder = MLP([latent_dim, *hidden[::-1], in_dim], rngs=rngs)
    self.codebooks = nnx.Param(
        init_scale * jax.random.normal(rngs.params(), (levels, codebook_size, latent_dim)))

  def __call__(self, x):
    """Args: x [B, D]. Returns a dict: x_hat [B, D], z [B, Dz], codes [B, L], losses, norms."""
    z = self.encoder(x)  # [B, Dz]
    z_q, codes, cb_loss, commit_loss, norms = residual_quantize(z, self.codebooks[...])
    x_hat = self.decoder(z_q)  # [B, D]
    recon = jnp.mean(jnp.sum((x_hat - x) ** 2, -1))
    return dict(x_hat=x_hat, z=z, codes=codes, recon_loss=recon, codebook_loss=cb_loss,
                commit_loss=commit_loss, norms=norms)


def _loss_fn(params, rest, graphdef, x, beta):
  out = nnx.merge(graphdef, params, rest)(x)
  loss = out["recon_loss"] + out["codebook_loss"] + beta * out["commit_loss"]
  metrics = dict(loss=loss, recon_loss=out["recon_loss"], codebook_loss=out["codebook_loss"],
                 commit_loss=out["commit_loss"])
  return loss, metrics


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float):
  # One transformation object per rate: it is a static jit argument, so a fresh one per call
  # would recompile the train step.
  return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def _train_step(params, opt_state, rest, x, beta, *, graphdef, tx):
  """One optimiser step on a batch x [B, D]; returns (params, opt_state, metrics)."""
  grads, metrics = jax.grad(_loss_fn, has_aux=True)(params, rest, graphdef, x, beta)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(params, rest, x, *, graphdef):
  """Latents [N, Dz], codes [N, L] and per-level input residuals [L, N, Dz] of all items."""
  model = nnx.merge(graphdef, params, rest)
  z = model.encoder(x)  # [N, Dz]
  cbs = model.codebooks[...]  # [L, C, Dz]
  resid, codes, resids = z, [], []
  for level in range(cbs.shape[0]):
    idx = jnp.argmin(_sq_dists(resid, cbs[level]), -1).astype(jnp.int32)  # [N]
    resids.append(resid)
    codes.append(idx)
    resid = resid - cbs[level][idx]
  return z, jnp.stack(codes, 1), jnp.stack(resids)


def reset_dead_codes(codebook: np.ndarray, counts: np.ndarray, residuals: np.ndarray,
                     rng: np.random.Generator, threshold: int = 1):
  """Re-initialises codes used fewer than `threshold` times to residuals of random items.

  Args:
    codebook: [C, Dz] one level's codebook.
    counts: [C] how many items chose each code over the window.
    residuals: [N, Dz] the residuals this level quantises (encoder outputs for level 0).
    rng: numpy Generator, so resets are reproducible.
    threshold: minimum count for a code to be alive.

  Returns:
    codebook: [C, Dz] a new array with the dead rows replaced by distinct items' residuals.
    num_reset: int, how many codes were re-initialised.
  """
  dead = np.flatnonzero(np.asarray(counts) < threshold)
  codebook = np.array(codebook, copy=True)
  if dead.size:
    pick = rng.choice(residuals.shape[0], size=dead.size, replace=dead.size > residuals.shape[0])
    codebook[dead] = residuals[pick]
  return codebook, int(dead.size)


def train_rqvae(x: np.ndarray, *, levels: int, codebook_size: int, seed: int = 0,
                hidden_dims: Sequence[int] = RQVAE_DEFAULTS["hidden_dims"],
                latent_dim: int = RQVAE_DEFAULTS["latent_dim"],
                epochs: int = RQVAE_DEFAULTS["epochs"],
                batch_size: int = RQVAE_DEFAULTS["batch_size"],
                learning_rate: float = RQVAE_DEFAULTS["learning_rate"],
                beta: float = RQVAE_DEFAULTS["beta"],
                codebook_init: str = RQVAE_DEFAULTS["codebook_init"],
                init_scale: float = RQVAE_DEFAULTS["init_scale"],
                dead_code_threshold: int = RQVAE_DEFAULTS["dead_code_threshold"],
                reset_every: int = RQVAE_DEFAULTS["reset_every"],
                kmeans_iters: int = TOKENIZER_DEFAULTS["kmeans_iters"],
                kmeans_init: str = TOKENIZER_DEFAULTS["kmeans_init"]):
  """Trains an RQ-VAE on the item embeddings and returns the items' semantic IDs.

  Codebooks start from residual k-means on the encoder outputs of all items (at initialisation)
  when `codebook_init == 'kmeans'`, else from N(0, init_scale²). Every `reset_every` epochs
  (never after the last), codes chosen by fewer than `dead_code_threshold` items are reset to
  the residuals of random items at that level, and usage is recounted. Each epoch visits
  N // batch_size shuffled batches of equal shape (one compilation).

  Args:
    x: [N, D] float32 item embeddings.
    levels: L.
    codebook_size: C (<= N, else ValueError).
    seed: PRNG seed; equal seeds give equal codes and losses.
    hidden_dims, latent_dim: encoder widths (the decoder mirrors them) and Dz.
    epochs, batch_size, learning_rate: Adam training schedule.
    beta: commitment-loss weight.
    codebook_init: 'kmeans' or 'random'.
    init_scale: std of random codebook entries.
    dead_code_threshold, reset_every: dead-code rule, see above.
    kmeans_iters, kmeans_init: settings of the k-means initialisation.

  Returns:
    codes: [N, L] int32 numpy array from the trained model.
    info: JSON-serialisable dict: per-epoch `loss`, `recon_loss`, `codebook_loss`,
      `commit_loss`, `grad_norm` (means over the epoch's steps); `usage` [epochs][L] fraction of
      codes used by the items at the end of each epoch (before any reset);
      `dead_codes_reset` [epochs][L] codes reset after each epoch; `dead_codes_reset_total`;
      `initial_usage` [L] (right after codebook initialisation); `final_usage` [L];
      `residual_norms` [L + 1] of the final latents (see `residual_norms`).
  """
  x = np.asarray(x, np.float32)
  n, d = x.shape
  _check_sizes(n, codebook_size, levels)
  if codebook_init not in ("kmeans", "random"):
    raise ValueError(f"unknown codebook_init {codebook_init!r}; choose 'kmeans' or 'random'")
  key = jax.random.key(seed)
  np_rng = np.random.default_rng(seed)
  model = RQVAE(d, hidden_dims, latent_dim, levels, codebook_size,
                rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)), init_scale=init_scale)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  xj = jnp.asarray(x)

  if codebook_init == "kmeans":
    z, _, _ = _encode(params, rest, xj, graphdef=graphdef)
    _, cbs = _rq_kmeans_jax(z, levels, codebook_size, kmeans_iters,
                            jax.random.fold_in(key, 1), kmeans_init)
    params["codebooks"][...] = jnp.stack(cbs)

  def usage(codes):
    return [int(np.unique(codes[:, l]).size) / codebook_size for l in range(levels)]

  _, codes, _ = _encode(params, rest, xj, graphdef=graphdef)
  info: dict[str, Any] = dict(initial_usage=usage(np.asarray(codes)))

  tx = _adam(float(learning_rate))
  opt_state = tx.init(params)
  batch_size = min(batch_size, n)
  steps = n // batch_size
  beta = jnp.float32(beta)
  names = ("loss", "recon_loss", "codebook_loss", "commit_loss", "grad_norm")
  curves = {k: [] for k in names}
  info["usage"], info["dead_codes_reset"] = [], []
  window_counts = np.zeros((levels, codebook_size), np.int64)
  for epoch in range(epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2 + epoch), n))
    sums = {k: 0.0 for k in names}
    for s in range(steps):
      batch = xj[perm[s * batch_size:(s + 1) * batch_size]]  # [B, D]
      params, opt_state, m = _train_step(params, opt_state, rest, batch, beta,
                                         graphdef=graphdef, tx=tx)
      sums = {k: sums[k] + m[k] for k in names}  # stays on device: no host sync per step
    for k in names:
      curves[k].append(float(sums[k]) / steps)

    _, codes, resids = _encode(params, rest, xj, graphdef=graphdef)
    codes = np.asarray(codes)
    info["usage"].append(usage(codes))
    for l in range(levels):
      window_counts[l] += np.bincount(codes[:, l], minlength=codebook_size)
    resets = [0] * levels
    if (epoch + 1) % reset_every == 0 and epoch + 1 < epochs:
      # Level l's reset changes the residuals of later levels, so later levels are reset
      # against residuals recomputed with the already-reset codebooks.
      cbs = np.array(params["codebooks"][...])
      for l in range(levels):
        cbs[l], resets[l] = reset_dead_codes(cbs[l], window_counts[l], np.asarray(resids[l]),
                                             np_rng, dead_code_threshold)
        if resets[l]:
          params["codebooks"][...] = jnp.asarray(cbs)
          _, _, resids = _encode(params, rest, xj, graphdef=graphdef)
      window_counts[:] = 0
    info["dead_codes_reset"].append(resets)

  z, codes, _ = _encode(params, rest, xj, graphdef=graphdef)
  codes = np.asarray(codes)
  info.update(curves)
  info["dead_codes_reset_total"] = int(np.sum(info["dead_codes_reset"]))
  info["final_usage"] = usage(codes)
  info["residual_norms"] = residual_norms(np.asarray(z), codes,
                                          list(np.asarray(params["codebooks"][...])))
  return codes, info


# ---------------------------------------------------------------------------------------------
# SIDs, buckets, report


def deduplicate(codes: np.ndarray) -> np.ndarray:
  """Appends a level that makes every full SID unique.

  Items sharing the same L codes get 0, 1, 2, ... in item order; the others get 0.

  Args:
    codes: [N, L] int.

  Returns:
    [N, L + 1] int32; the first L columns equal `codes`.
  """
  codes = np.asarray(codes, np.int32)
  _, inverse = np.unique(codes, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  order = np.argsort(inverse, kind="stable")  # groups contiguous, item order inside each group
  grouped = inverse[order]
  starts = np.r_[0, np.flatnonzero(grouped[1:] != grouped[:-1]) + 1]
  group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
  extra = np.empty(len(codes), np.int32)
  extra[order] = np.arange(len(order)) - group_start
  return np.concatenate([codes, extra[:, None]], 1)


def prefix_buckets(codes: np.ndarray, prefix_len: int):
  """Groups items by the first `prefix_len` levels of their SID.

  Prefixes are numbered in lexicographic order; items within a bucket are in item order.
  `prefix_len == 0` puts every item in one bucket (the `gr_id` mode).

  Args:
    codes: [N, L] int.
    prefix_len: ℓ, 0 <= ℓ <= L.

  Returns:
    prefix_ids: [N] int32, the dense id of each item's prefix.
    bucket_table: [P, Bmax] int32 item indices, padded with -1.
    bucket_sizes: [P] int32.
    prefixes: [P, ℓ] int32, row p is the prefix with id p.
  """
  codes = np.asarray(codes, np.int32)
  n, levels = codes.shape
  if not 0 <= prefix_len <= levels:
    raise ValueError(f"prefix_len must be in [0, {levels}], got {prefix_len}")
  if prefix_len == 0:
    prefixes = np.zeros((1, 0), np.int32)
    prefix_ids = np.zeros(n, np.int32)
  else:
    prefixes, prefix_ids = np.unique(codes[:, :prefix_len], axis=0, return_inverse=True)
    prefixes = prefixes.astype(np.int32)
    prefix_ids = prefix_ids.reshape(-1).astype(np.int32)
  num = prefixes.shape[0]
  sizes = np.bincount(prefix_ids, minlength=num).astype(np.int32)
  order = np.argsort(prefix_ids, kind="stable")
  starts = np.r_[0, np.cumsum(sizes)[:-1]]
  slot = np.arange(n) - np.repeat(starts, sizes)
  table = np.full((num, int(sizes.max()) if n else 0), -1, np.int32)
  table[prefix_ids[order], slot] = order
  return prefix_ids, table, sizes, prefixes


def collision_rate(codes: np.ndarray) -> float:
  """Fraction of items whose full code row is shared with at least one other item."""
  codes = np.asarray(codes)
  if len(codes) == 0:
    return 0.0
  _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  return float(np.mean(counts[inverse.reshape(-1)] > 1))


def tokenizer_report(codes: np.ndarray, sids: np.ndarray, bucket_sizes: np.ndarray,
                     codebook_size: int, residual_norms: Sequence[float] | None = None) -> dict:
  """Summary of a tokenisation; all values are plain Python numbers and lists.

  Args:
    codes: [N, L] codes before de-duplication.
    sids: [N, L'] the final SIDs (L' = L + 1 after de-duplication, else L).
    bucket_sizes: [P] items per prefix bucket.
    codebook_size: C.
    residual_norms: optional L + 1 mean residual norms (see `residual_norms`).

  Returns:
    dict with `num_items`, `levels`, `codebook_size`, `usage_per_level` (fraction of the C
    codes used at each level), `used_codes_per_level`, `collision_rate_before` (fraction of
    items whose L-level code is shared), `max_items_per_code`, `collision_rate_after`,
    `sid_levels`, `dedup_level_size` (codes needed by the extra level; 0 without one),
    `num_prefixes`, `bucket_size_max`, `bucket_size_mean` and, if given, `residual_norms`.
  """
  codes = np.asarray(codes)
  sids = np.asarray(sids)
  bucket_sizes = np.asarray(bucket_sizes)
  used = [int(np.unique(codes[:, l]).size) for l in range(codes.shape[1])]
  _, counts = np.unique(codes, axis=0, return_counts=True)
  report = dict(
      num_items=int(codes.shape[0]),
      levels=int(codes.shape[1]),
      codebook_size=int(codebook_size),
      usage_per_level=[u / codebook_size for u in used],
      used_codes_per_level=used,
      collision_rate_before=collision_rate(codes),
      max_items_per_code=int(counts.max()) if counts.size else 0,
      collision_rate_after=collision_rate(sids),
      sid_levels=int(sids.shape[1]),
      dedup_level_size=int(sids[:, -1].max()) + 1 if sids.shape[1] > codes.shape[1] else 0,
      num_prefixes=int(bucket_sizes.size),
      bucket_size_max=int(bucket_sizes.max()) if bucket_sizes.size else 0,
      bucket_size_mean=float(bucket_sizes.mean()) if bucket_sizes.size else 0.0,
  )
  if residual_norms is not None:
    report["residual_norms"] = [float(r) for r in residual_norms]
  return report


def _get(cfg, name, default):
  """cfg.name if the config (ConfigDict, dataclass, namespace or dict) has it, else default."""
  if cfg is None:
    return default
  if isinstance(cfg, dict) or hasattr(cfg, "keys"):
    try:
      return cfg[name] if name in cfg else default
    except TypeError:
      pass
  return getattr(cfg, name, default)


def tokenize_items(x: np.ndarray, tok_cfg, seed: int = 0) -> dict:
  """Quantises item embeddings into SIDs and builds the prefix buckets.

  Args:
    x: [N, D] float32 item embeddings (grounded, or raw text for the ablation).
    tok_cfg: `config.tokenizer`: kind ('rqkmeans' | 'rqvae'), levels, codebook_size,
      prefix_len, dedup, optional kmeans_iters / kmeans_init and an optional `rqvae`
      sub-config (fields of RQVAE_DEFAULTS); missing optional fields take the defaults above.
    seed: PRNG seed.

  Returns:
    dict with `codes` [N, L] int32, `sids` [N, L + 1] (or [N, L] without dedup) int32,
    `prefix_ids` [N], `bucket_table` [P, Bmax] (-1 padded), `bucket_sizes` [P], `prefixes`
    [P, ℓ], `report` (see `tokenizer_report`) and `train_info` (RQ-VAE curves; {} for
    RQ-KMeans).
  """
  x = np.asarray(x, np.float32)
  kind = _get(tok_cfg, "kind", None)
  levels = int(tok_cfg.levels)
  size = int(tok_cfg.codebook_size)
  iters = int(_get(tok_cfg, "kmeans_iters", TOKENIZER_DEFAULTS["kmeans_iters"]))
  init = _get(tok_cfg, "kmeans_init", TOKENIZER_DEFAULTS["kmeans_init"])
  if kind == "rqkmeans":
    codes, codebooks = rq_kmeans(x, levels, size, iters=iters, seed=seed, init=init)
    norms = residual_norms(x, codes, codebooks)
    train_info = {}
  elif kind == "rqvae":
    sub = _get(tok_cfg, "rqvae", None)
    kwargs = {k: _get(sub, k, v) for k, v in RQVAE_DEFAULTS.items()}
    kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    codes, train_info = train_rqvae(x, levels=levels, codebook_size=size, seed=seed,
                                    kmeans_iters=iters, kmeans_init=init, **kwargs)
    norms = train_info["residual_norms"]
  else:
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'rqkmeans' or 'rqvae'")
  sids = deduplicate(codes) if _get(tok_cfg, "dedup", True) else codes
  prefix_ids, table, sizes, prefixes = prefix_buckets(sids, int(_get(tok_cfg, "prefix_len", 1)))
  report = tokenizer_report(codes, sids, sizes, size, norms)
  report["kind"] = kind
  return dict(codes=codes, sids=sids, prefix_ids=prefix_ids, bucket_table=table,
              bucket_sizes=sizes, prefixes=prefixes, report=report, train_info=train_info)
