"""Qwen3-style decoder backbone in Flax NNX (DESIGN §1.3).

RMSNorm, rotary position embeddings, grouped-query attention with optional per-head QK-norm,
SwiGLU MLP, tied or separate output layer. Every parameter carries logical axis names (see
`configs/base.py:axis_rules`); `sigma_jax.parallel` maps them to the mesh.

Functional use (DESIGN/STYLE: the module is split once and merged inside jitted functions):

  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  hidden = apply(graphdef, params, tokens, attn_mask=mask)             # [B, T, D]
  logits = apply(graphdef, params, hidden, method='logits')            # [B, T, V]

Inputs that may be left- or right-padded take `attn_mask` [B, T] (True = real token): padded
positions are never attended to, and by default real tokens get RoPE positions 0, 1, ... counted
over real tokens only, so a padded prompt gives the same hidden states as the unpadded one.
Packed rows (several sequences back to back in one row, `segment_ids` [B, T]) attend within
their own segment only, and each segment's positions restart at 0: a packed sequence gets the
hidden states it gets alone in its own row.

KV cache (`KVCache`, fixed shapes, batch leading on every array so a beam search can reorder rows
with `jax.tree.map(lambda x: x[rows], cache)`):
  * `k[l]`, `v[l]` [B, S, KV, Dh] per layer, S = cache length;
  * `valid` [B, S] bool, which slots hold a real (non-padding) token;
  * `index` [B] int32, the next slot to write;
  * `pos` [B] int32, the RoPE position of the next real token.
A call with a cache writes its T tokens to slots index .. index+T-1 of every row (padding too,
marked invalid) and attends to valid slots up to the query's own slot. Prefill is such a call on
an empty cache; one-step decode is a call with T = 1. Slots are never compacted: padding in a
right-padded prompt costs cache slots but is masked out. Writes beyond S are dropped silently
(no error inside jit), so size S >= prompt length + decode steps. `KVCache.shardings` gives its
jit shardings (k/v: batch, length, kv_heads, kv).

Activations are constrained by logical names through `parallel.constrain` (residual stream
[B, T, D]: batch, length, embed; logits: batch, length, vocab); the constraints are no-ops unless
the caller traces inside `parallel.activation_sharding(mesh, rules)`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sigma_jax import parallel
from sigma_jax.numerics import NEG_INF

# Logical axes of the residual stream [B, T, D].
ACT = ("batch", "length", "embed")


def dense(x: jax.Array, w: jax.Array, contract: int = 1,
          preferred_element_type=None) -> jax.Array:
  """``x [..., *in] · w [*in, *out] -> [..., *out]``, as one 2-D matrix product.

  The contraction of ``jnp.einsum`` over x's last ``contract`` axes and w's first, written as
  ``[rows, in] @ [in, out]`` on the flattened leading axes. Given several leading (batch,
  length) axes, XLA:CPU computes the weight gradient as a slow contraction over two dimensions:
  on the SFT step's shapes an MLP's forward + backward took 2.3× longer than flattened
  (``python -m launch.benchmark matmul_layouts``; ``docs/PERFORMANCE.md``, "The backward
  pass"). The reshapes merge contiguous leading axes only.
  """
  lead = x.shape[:x.ndim - contract]
  k = math.prod(w.shape[:contract])
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1),
                 preferred_element_type=preferred_element_type)
  return y.reshape(lead + tuple(w.shape[contract:]))


# Grouped-query attention as one [G·T, Dh] x [Dh, S] product per (row, kv head): the G query
# heads of a kv head are stacked as rows. XLA:CPU runs this, backward included, about 1.5x
# faster than einsums with (g, t) as separate free axes (`python -m launch.benchmark
# matmul_layouts`).
def grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """q [B, T, KV, G, Dh], k [B, S, KV, Dh] -> unscaled f32 scores [B, KV, G, T, S]."""
  b, t, kv, g, dh = q.shape
  qg = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
  scores = jnp.einsum("bkqd,bskd->bkqs", qg, k, preferred_element_type=jnp.float32)
  return scores.reshape(b, kv, g, t, -1)


def grouped_values(probs: jax.Array, v: jax.Array) -> jax.Array:
  """probs [B, KV, G, T, S], v [B, S, KV, Dh] -> [B, T, KV, G, Dh]."""
  b, kv, g, t, s = probs.shape
  out = jnp.einsum("bkqs,bskd->bkqd", probs.reshape(b, kv, g * t, s), v)
  return out.reshape(b, kv, g, t, -1).transpose(0, 3, 1, 2, 4)


def _param(init, names: tuple[str | None, ...], key, shape: tuple[int, ...]) -> nnx.Param:
  # Eager sharding off: the module builds anywhere (tests, CPU, inside eval_shape); placement
  # is done by parallel.init_sharded via jit out_shardings.
  return nnx.Param(
      nnx.with_partitioning(init, names, eager_sharding=False)(key, shape, jnp.float32))


def _fan_in(in_axis, out_axis):
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                           out_axis=out_axis)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis, computed in float32."""

  def __init__(self, dim: int, *, eps: float):
    self.scale = _param(nnx.initializers.ones, ("norm",), None, (dim,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [..., dim]. Returns: [..., dim] in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, split-halves convention (as Qwen/Llama).

  Args:
    x: [B, T, N, Dh] queries or keys, Dh even.
    positions: [B, T] int positions.
    theta: base wavelength.

  Returns:
    [B, T, N, Dh] in x's dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention: `num_heads` query heads share `num_kv_heads` key/value heads."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if h % kv:
      raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={kv}")
    if dh % 2:
      raise ValueError(f"head_dim={dh} must be even for RoPE")
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, dh
    self.rope_theta = float(cfg.rope_theta)
    self.dtype = jnp.dtype(cfg.dtype)
    self.q_proj = _param(_fan_in(0, (1, 2)), ("embed", "heads", "kv"), rngs.params(), (d, h, dh))
    self.k_proj = _param(_fan_in(0, (1, 2)), ("embed", "kv_heads", "kv"), rngs.params(),
                         (d, kv, dh))
    self.v_proj = _param(_fan_in(0, (1, 2)), ("embed", "kv_heads", "kv"), rngs.params(),
                         (d, kv, dh))
    self.o_proj = _param(_fan_in((0, 1), 2), ("heads", "kv", "embed"), rngs.params(), (h, dh, d))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(dh, eps=cfg.norm_eps)
      self.k_norm = RMSNorm(dh, eps=cfg.norm_eps)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x, positions, mask, kv_cache=None, write=None, shared=None):
    """Attention of T new tokens over themselves or over a cache.

    Args:
      x: [B, T, D] normalised inputs.
      positions: [B, T] RoPE positions.
      mask: [B, T, S] bool, which keys each query may see (S = T without a cache).
      kv_cache: None, or (k [B, S, KV, Dh], v [B, S, KV, Dh]).
      write: with a cache, (src [B, S] int index into T, written [B, S] bool): slot s of row b
        takes the new key/value of token src[b, s] where written[b, s].
      shared: with a cache, None or (k [P, Sp, KV, Dh], v [P, Sp, KV, Dh], valid [P, Sp] bool),
        keys every query of rows p*G' .. p*G'+G'-1 also sees (G' = B / P), before its own
        cache: the prompt cache shared by a prompt's beams (see `Decoder.__call__`).

    Returns:
      (out [B, T, D], (k, v) updated cache or None).
    """
    dt = self.dtype
    b, t, _ = x.shape
    x = x.astype(dt)
    q = dense(x, self.q_proj[...].astype(dt))  # [B, T, H, Dh]
    k = dense(x, self.k_proj[...].astype(dt))  # [B, T, KV, Dh]
    v = dense(x, self.v_proj[...].astype(dt))  # [B, T, KV, Dh]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions, self.rope_theta)
    k = rope(k, positions, self.rope_theta)

    new_cache = None
    if kv_cache is not None:
      src, written = write
      # A gather, not a one-hot matmul: exact at any matmul precision.
      idx = src[:, :, None, None]  # [B, S, 1, 1]
      k = jnp.where(written[:, :, None, None], jnp.take_along_axis(k, idx, axis=1),
                    kv_cache[0].astype(dt))  # [B, S, KV, Dh]
      v = jnp.where(written[:, :, None, None], jnp.take_along_axis(v, idx, axis=1),
                    kv_cache[1].astype(dt))  # [B, S, KV, Dh]
      new_cache = (k, v)

    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)  # [B, T, KV, G, Dh]
    if shared is not None:
      out = self._attend_shared(q, k, v, mask, shared)  # [B, T, H, Dh]
      out = dense(out, self.o_proj[...].astype(dt), contract=2)  # [B, T, D]
      return out, new_cache
    if t == 1:
      # One query per row (decoding): as einsums these become B*KV tiny matrix products, which
      # XLA:CPU runs one by one; multiply-and-sum is several times faster and exact in f32.
      kt = jnp.swapaxes(k, 1, 2)[:, :, None].astype(jnp.float32)  # [B, KV, 1, S, Dh]
      scores = jnp.sum(q[:, 0, :, :, None, :].astype(jnp.float32) * kt,
                       axis=-1)[:, :, :, None, :] * self.head_dim ** -0.5  # [B, KV, G, 1, S]
    else:
      scores = grouped_scores(q, k) * self.head_dim ** -0.5
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)  # [B, KV, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if t == 1:
      vt = jnp.swapaxes(v, 1, 2)[:, :, None]  # [B, KV, 1, S, Dh]
      out = jnp.sum(probs[:, :, :, 0, :, None] * vt, axis=3)  # [B, KV, G, Dh]
      out = out.reshape(b, 1, self.num_heads, self.head_dim)
    else:
      out = grouped_values(probs, v).reshape(b, t, self.num_heads, self.head_dim)
    out = dense(out, self.o_proj[...].astype(dt), contract=2)  # [B, T, D]
    return out, new_cache

  def _attend_shared(self, q, k, v, mask, shared):
    """Attention over a shared prompt part and each row's own cache, without tiling the prompt.

    Args:
      q: [B, T, KV, G, Dh] queries (B = P * beams rows, row p*beams + j is beam j of prompt p).
      k, v: [B, S, KV, Dh] each row's own cache (the generated tokens).
      mask: [B, T, S] bool over the own cache.
      shared: (k [P, Sp, KV, Dh], v [P, Sp, KV, Dh], valid [P, Sp]) of the prompts.

    Returns:
      [B, T, H, Dh]. The softmax runs over the Sp + S keys [prompt slots, own slots], the
      layout of one cache holding both, so the weights are those of the tiled cache.
    """
    dt = self.dtype
    sk, sv, svalid = shared
    b, t, kvh, g, dh = q.shape
    p, sp = svalid.shape
    beams = b // p
    scale = self.head_dim ** -0.5
    qp = q.reshape(p, beams, t, kvh, g, dh)  # [P, beams, T, KV, G, Dh]
    if t == 1:
      # Multiply-and-sum as in `__call__`'s one-query path (XLA:CPU runs tiny einsums slowly).
      skt = jnp.swapaxes(sk, 1, 2)[:, None, :, None].astype(jnp.float32)  # [P,1,KV,1,Sp,Dh]
      prompt_scores = jnp.sum(qp[:, :, 0, :, :, None, :].astype(jnp.float32) * skt,
                              axis=-1)[..., None, :] * scale  # [P, beams, KV, G, 1, Sp]
      kt = jnp.swapaxes(k, 1, 2)[:, :, None].astype(jnp.float32)  # [B, KV, 1, S, Dh]
      own_scores = jnp.sum(q[:, 0, :, :, None, :].astype(jnp.float32) * kt,
                           axis=-1)[:, :, :, None, :] * scale  # [B, KV, G, 1, S]
    else:
      prompt_scores = jnp.einsum("pjtkgd,pskd->pjkgts", qp, sk,
                                 preferred_element_type=jnp.float32) * scale
      own_scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                              preferred_element_type=jnp.float32) * scale  # [B, KV, G, T, S]
    prompt_scores = prompt_scores.reshape(b, kvh, g, t, sp)  # [B, KV, G, T, Sp]
    prompt_mask = jnp.broadcast_to(jnp.repeat(svalid, beams, axis=0)[:, None, :], (b, t, sp))
    full_mask = jnp.concatenate([prompt_mask, mask], axis=-1)  # [B, T, Sp + S]
    scores = jnp.concatenate([prompt_scores, own_scores], axis=-1)  # [B, KV, G, T, Sp + S]
    scores = jnp.where(full_mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    prompt_probs = probs[..., :sp].reshape(p, beams, kvh, g, t, sp)
    own_probs = probs[..., sp:]  # [B, KV, G, T, S]
    if t == 1:
      svt = jnp.swapaxes(sv, 1, 2)[:, None, :, None]  # [P, 1, KV, 1, Sp, Dh]
      out = jnp.sum(prompt_probs[:, :, :, :, 0, :, None] * svt, axis=-2)  # [P, beams, KV, G, Dh]
      vt = jnp.swapaxes(v, 1, 2)[:, :, None]  # [B, KV, 1, S, Dh]
      out = out.reshape(b, kvh, g, dh) + jnp.sum(own_probs[:, :, :, 0, :, None] * vt, axis=3)
      return out.reshape(b, 1, self.num_heads, dh)
    out = jnp.einsum("pjkgts,pskd->pjtkgd", prompt_probs, sv).reshape(b, t, kvh, g, dh)
    out = out + jnp.einsum("bkgts,bskd->btkgd", own_probs, v)
    return out.reshape(b, t, self.num_heads, dh)


class MLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.dtype = jnp.dtype(cfg.dtype)
    self.gate = _param(_fan_in(0, 1), ("embed", "mlp"), rngs.params(), (d, f))
    self.up = _param(_fan_in(0, 1), ("embed", "mlp"), rngs.params(), (d, f))
    self.down = _param(_fan_in(0, 1), ("mlp", "embed"), rngs.params(), (f, d))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, T, D]. Returns: [B, T, D]."""
    dt = self.dtype
    x = x.astype(dt)
    h = jax.nn.silu(dense(x, self.gate[...].astype(dt))) * dense(x, self.up[...].astype(dt))
    return dense(h, self.down[...].astype(dt))  # [B, T, D]; h is [B, T, F]


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, mask, kv_cache=None, write=None, shared=None):
    h, kv_cache = self.attn(self.attn_norm(x), positions, mask, kv_cache, write, shared)
    x = parallel.constrain(x + h, ACT)
    x = parallel.constrain(x + self.mlp(self.mlp_norm(x)), ACT)
    return x, kv_cache


@flax.struct.dataclass
class KVCache:
  """Fixed-shape decoding cache; batch is the leading axis of every field.

  Attributes:
    k: per layer, [B, S, KV, Dh] keys (after QK-norm and RoPE).
    v: per layer, [B, S, KV, Dh] values.
    valid: [B, S] bool, slot holds a real token.
    index: [B] int32, next slot to write.
    pos: [B] int32, RoPE position of the next real token.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array
  pos: jax.Array

  def logical_axes(self) -> dict[str, tuple[str, ...]]:
    """Logical axis names per field kind ('kv' for k and v, and the other fields)."""
    return {"kv": ("batch", "length", "kv_heads", "kv"), "valid": ("batch", "length"),
            "index": ("batch",), "pos": ("batch",)}

  def shardings(self, mesh, rules) -> "KVCache":
    """A KVCache of NamedShardings on `mesh` under `rules` (for jit in/out_shardings)."""
    names = self.logical_axes()
    kv = parallel.logical_sharding(mesh, names["kv"], rules)
    return KVCache(k=tuple(kv for _ in self.k), v=tuple(kv for _ in self.v),
                   valid=parallel.logical_sharding(mesh, names["valid"], rules),
                   index=parallel.logical_sharding(mesh, names["index"], rules),
                   pos=parallel.logical_sharding(mesh, names["pos"], rules))

  def truncate(self, length: int) -> "KVCache":
    """The first `length` slots of every row (index and pos unchanged)."""
    return self.replace(k=tuple(x[:, :length] for x in self.k),
                        v=tuple(x[:, :length] for x in self.v), valid=self.valid[:, :length])


def init_cache(cfg, batch: int, max_len: int | None = None) -> KVCache:
  """An empty cache.

  Args:
    cfg: the model config (or a Decoder): num_layers, num_kv_heads, head_dim, max_len, dtype.
    batch: rows B.
    max_len: slots S; default cfg.max_len.

  Returns:
    A `KVCache` with no valid slot, index 0 and position 0 in every row.
  """
  s = int(cfg.max_len if max_len is None else max_len)
  shape = (batch, s, cfg.num_kv_heads, cfg.head_dim)
  dt = jnp.dtype(cfg.dtype)
  return KVCache(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                 v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                 valid=jnp.zeros((batch, s), bool),
                 index=jnp.zeros((batch,), jnp.int32),
                 pos=jnp.zeros((batch,), jnp.int32))


def beam_cache(prompt: KVCache, max_len: int) -> KVCache:
  """An empty cache that continues `prompt` (its rows' RoPE positions), for `shared` decoding.

  Args:
    prompt: a prefilled `KVCache` [P rows].
    max_len: slots for the tokens decoded after the prompt.

  Returns:
    A `KVCache` of P rows and `max_len` slots, none valid, index 0, pos = prompt.pos. Tile
    its rows to P * beams (row p*beams + j) before decoding with `shared=prompt`.
  """
  shape = (prompt.valid.shape[0], int(max_len)) + prompt.k[0].shape[2:]
  return KVCache(k=tuple(jnp.zeros(shape, x.dtype) for x in prompt.k),
                 v=tuple(jnp.zeros(shape, x.dtype) for x in prompt.v),
                 valid=jnp.zeros(shape[:2], bool),
                 index=jnp.zeros_like(prompt.index), pos=prompt.pos)


class Decoder(nnx.Module):
  """Qwen3-style decoder-only transformer.

  Parameters (logical axes): `embedding` [V, D] (vocab, embed); per layer `attn_norm`,
  `mlp_norm` scale [D] (norm); `attn.q_proj` [D, H, Dh] (embed, heads, kv); `attn.k_proj`,
  `attn.v_proj` [D, KV, Dh] (embed, kv_heads, kv); `attn.o_proj` [H, Dh, D] (heads, kv, embed);
  `attn.q_norm`, `attn.k_norm` scale [Dh] (norm) when cfg.qk_norm; `mlp.gate`, `mlp.up` [D, F]
  (embed, mlp); `mlp.down` [F, D] (mlp, embed); `final_norm` scale [D] (norm); `lm_head`
  [D, V] (embed, vocab) when not cfg.tie_embeddings. Parameters are float32; activations use
  cfg.dtype; norms, softmax and logits are float32.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    # Plain static fields, not the ConfigDict: a graphdef must be hashable.
    self.num_layers, self.num_kv_heads = int(cfg.num_layers), int(cfg.num_kv_heads)
    self.head_dim, self.max_len = int(cfg.head_dim), int(cfg.max_len)
    self.dtype = jnp.dtype(cfg.dtype)
    self.embedding = _param(nnx.initializers.normal(0.02), ("vocab", "embed"), rngs.params(),
                            (cfg.vocab_size, cfg.d_model))
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _param(_fan_in(0, 1), ("embed", "vocab"), rngs.params(),
                            (cfg.d_model, cfg.vocab_size))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token embeddings. Args: tokens [B, T] int. Returns: [B, T, D] in cfg.dtype."""
    # Gathering from an fsdp-sharded table into batch-sharded rows makes XLA replicate it
    # anyway (with a warning); all-gather the embed axis explicitly first.
    table = parallel.constrain(self.embedding[...], ("vocab", None))  # [V, D]
    return jnp.take(table, tokens, axis=0).astype(self.dtype)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """See `init_cache`."""
    return init_cache(self, batch, max_len)

  def __call__(self, tokens: jax.Array, *, inject: jax.Array | None = None,
               inject_mask: jax.Array | None = None, positions: jax.Array | None = None,
               attn_mask: jax.Array | None = None, cache: KVCache | None = None,
               decode: bool = False, segment_ids: jax.Array | None = None,
               branch_ids: jax.Array | None = None, shared: KVCache | None = None):
    """Runs the decoder.

    Args:
      tokens: [B, T] int32 token ids.
      inject: [B, T, D] float vectors that replace the token embedding where `inject_mask`.
      inject_mask: [B, T] bool, required with `inject`.
      positions: [B, T] int RoPE positions; default counts real tokens (0-based), continuing
        from `cache.pos` when a cache is given.
      attn_mask: [B, T] bool, False marks padding (never attended to); default all True.
      cache: a `KVCache`; the T tokens are appended at each row's `cache.index`.
      decode: one-step decoding; requires a cache and T == 1 (same computation as a cached call).
      segment_ids: [B, T] int, packed rows (no cache): which sequence each token belongs to, each
        sequence contiguous and its tokens real; a token attends only to its own segment and its
        default position counts from its segment's first token. Padding (``attn_mask`` False)
        is never attended to by real tokens.
      branch_ids: [B, T] int, with ``segment_ids``: branches of a segment that share its trunk.
        Trunk tokens (branch 0) attend to earlier trunk tokens only; a token of branch k > 0
        attends to the earlier trunk tokens and to its own branch. A segment laid out as trunk
        part, branch 1, more trunk, branch 2, ... computes each branch exactly as the sequence
        "trunk up to the branch, then the branch" would, given ``positions`` that continue each
        branch from its trunk (``prompts.pack`` with shared histories).
      shared: with a cache, a prompt `KVCache` of P rows that B = P * beams rows share (row
        p*beams + j reads prompt p): every token also attends to the valid slots of its prompt,
        which come before all of `cache`'s slots. Beams then keep only their own tokens in
        `cache` (`beam_cache`), and nothing tiles or reorders the prompt. Same result as one
        cache holding the prompt's slots then the row's, up to float rounding of the sums.

    Returns:
      hidden [B, T, D] after the final norm; with a cache, (hidden, updated cache).
    """
    b, t = tokens.shape
    if decode and (cache is None or t != 1):
      raise ValueError(f"decode=True needs a cache and one token per row; got T={t}, "
                       f"cache={'set' if cache is not None else None}")
    x = self.embed(tokens)  # [B, T, D]
    if inject is not None:
      if inject_mask is None:
        raise ValueError("inject needs inject_mask")
      x = jnp.where(inject_mask[..., None], inject.astype(self.dtype), x)
    x = parallel.constrain(x, ACT)
    mask = jnp.ones((b, t), bool) if attn_mask is None else attn_mask.astype(bool)
    # Positions count real tokens only, so a padded row sees the RoPE phases of its unpadded self.
    rank = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]

    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) cannot be used with a cache")
    if branch_ids is not None and (segment_ids is None or positions is None):
      raise ValueError("branch_ids need segment_ids and explicit positions")
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      attend = causal[None] & mask[:, None, :]  # [B, T, T]
      if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        rank = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # [B, T]
        same = seg[:, :, None] == seg[:, None, :]
        # Padding queries attend to earlier padding of their row, so no softmax row is empty.
        attend = causal[None] & same & (mask[:, None, :] | ~mask[:, :, None])
        if branch_ids is not None:
          br = branch_ids.astype(jnp.int32)
          attend &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
      if positions is None:
        positions = rank
      for layer in self.layers:
        x, _ = layer(x, positions, attend)
      return self.final_norm(x)

    s = cache.valid.shape[1]
    if positions is None:
      positions = cache.pos[:, None] + rank
    slots = jnp.arange(s)[None, :]  # [1, S]
    offset = slots - cache.index[:, None]  # [B, S], token index that writes each slot
    written = (offset >= 0) & (offset < t)  # [B, S]
    src = jnp.clip(offset, 0, t - 1)  # [B, S]
    valid = jnp.where(written, jnp.take_along_axis(mask, src, axis=1), cache.valid)  # [B, S]
    query_slot = cache.index[:, None] + jnp.arange(t)[None, :]  # [B, T]
    attend = valid[:, None, :] & (slots[:, None, :] <= query_slot[:, :, None])  # [B, T, S]
    if shared is not None and b % shared.valid.shape[0]:
      raise ValueError(f"{b} rows cannot share {shared.valid.shape[0]} prompts")
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      prompt = None if shared is None else (shared.k[i], shared.v[i], shared.valid)
      x, (k, v) = layer(x, positions, attend, (cache.k[i], cache.v[i]), (src, written), prompt)
      ks.append(k)
      vs.append(v)
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid,
                        index=cache.index + t,
                        pos=cache.pos + jnp.sum(mask, axis=1, dtype=jnp.int32))
    return self.final_norm(x), new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output layer. Args: hidden [B, T, D]. Returns: float32 logits [B, T, V]."""
    h = hidden.astype(self.dtype)
    if self.lm_head is None:
      w = self.embedding[...].astype(self.dtype)
      out = dense(h, w.T, preferred_element_type=jnp.float32)
    else:
      w = self.lm_head[...].astype(self.dtype)
      out = dense(h, w, preferred_element_type=jnp.float32)
    return parallel.constrain(out, ("batch", "length", "vocab"))

  def token_logits(self, hidden: jax.Array, ids: jax.Array) -> jax.Array:
    """Columns `ids` of `logits(hidden)`, without the full-vocabulary product.

    Decoding needs one SID level's C codes, not all V tokens: this multiplies by C rows of
    the (tied) embedding, or C columns of `lm_head`, only.

    Args:
      hidden: [B, T, D].
      ids: [W] int token ids in [0, V), the same for every row.

    Returns:
      float32 [B, T, W]; column w is `logits(hidden)[..., ids[w]]`.
    """
    h = hidden.astype(self.dtype)
    if self.lm_head is None:
      w = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)  # [W, D]
      return dense(h, w.T, preferred_element_type=jnp.float32)
    w = jnp.take(self.lm_head[...], ids, axis=1).astype(self.dtype)  # [D, W]
    return dense(h, w, preferred_element_type=jnp.float32)


def apply(graphdef: nnx.GraphDef, params: nnx.State, *args, method: str = "__call__",
          **kwargs) -> Any:
  """Pure call of a split Decoder: merges `(graphdef, params)` and calls `method`.

  Example: `apply(gd, p, tokens, attn_mask=m)`, `apply(gd, p, hidden, method='logits')`.
  """
  model = nnx.merge(graphdef, params)
  return getattr(model, method)(*args, **kwargs)


def copy_params(fresh: nnx.State, src: nnx.State, *, source: str, keep_fresh=(),
                hint: str = "") -> nnx.State:
  """``fresh``'s Decoder parameters with ``src``'s values copied in (another decoder's weights).

  Every parameter of ``fresh`` takes ``src``'s value of the same shape, except those under the
  top-level names ``keep_fresh`` (e.g. ``'lm_head'``), which keep their initialisation. The
  vocabulary may grow: where ``src``'s ``embedding`` (or another 2-D table) has fewer rows than
  ``fresh``'s and the same width, its rows are copied into the first rows and the remaining rows
  (the SID tokens after the SentencePiece pieces) keep their initialisation.

  Args:
    fresh: a freshly initialised ``Decoder`` parameter State (sharded or not); the result keeps
      each leaf's sharding.
    src: the loaded ``Decoder`` parameters.
    source: what ``src`` is, for error messages (e.g. "pretrained backbone").
    keep_fresh: top-level parameter names not copied.
    hint: appended to a shape error (what to check).

  Returns:
    A State shaped like ``fresh``.

  Raises:
    ValueError: ``src`` lacks a parameter, or a parameter's shape differs (both shapes named).
  """
  src_flat = dict(jax.tree_util.tree_flatten_with_path(src)[0])

  def merge(key_path, leaf):
    if key_path and getattr(key_path[0], "key", None) in keep_fresh:
      return leaf
    name = jax.tree_util.keystr(key_path)
    value = src_flat.get(key_path)
    if value is None:
      raise ValueError(f"{source} lacks parameter {name}")
    if value.shape == leaf.shape:
      new = value
    elif (value.ndim == leaf.ndim == 2 and value.shape[1] == leaf.shape[1]
          and value.shape[0] < leaf.shape[0]):
      new = jnp.asarray(leaf).at[:value.shape[0]].set(value)  # new vocabulary rows stay fresh
    else:
      raise ValueError(f"{source} parameter {name} has shape {tuple(value.shape)}; this "
                       f"model's is {tuple(leaf.shape)}{hint}")
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new)

  return jax.tree_util.tree_map_with_path(merge, fresh)


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Hidden state at each row's last real position.

  Args:
    hidden: [B, T, D].
    mask: [B, T] bool, True at real tokens (left or right padding).

  Returns:
    [B, D]. A row with no real token returns position T-1.
  """
  t = mask.shape[1]
  last = t - 1 - jnp.argmax(mask[:, ::-1].astype(bool), axis=1)  # [B]
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean next-token cross-entropy.

  Targets are already shifted: `targets[:, t]` is the token that follows position t.

  Args:
    logits: [B, T, V].
    targets: [B, T] int.
    weights: [B, T] float or bool; 0 excludes a position.

  Returns:
    Scalar float32: sum(w * CE) / sum(w), 0 when all weights are 0.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  w = weights.astype(jnp.float32)
  total = jnp.sum(w)
  return jnp.sum(ce * w) / jnp.where(total > 0, total, 1.0)
