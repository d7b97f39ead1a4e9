"""SASRec-style causal transformer over item ids (Kang & McAuley 2018), in Flax NNX.

The collaborative ID model of stage ``collab``: its item table is the frozen ``v_ID`` of the
grounding stage. Differences from the original SASRec, on purpose:
  * trained with a full softmax over all N items at every position (as in gSASRec / eSASRec)
    instead of one sampled negative with binary cross-entropy;
  * padding keys are masked in attention (the original relies on zeroed padding embeddings).

Item ids: row 0 of the embedding table is padding; item i (0-based, as in ``splits``) is row i+1;
``PAD_ITEM`` (-1) maps to row 0. Used in a functional core:
``graphdef, params = nnx.split(model, nnx.Param)`` and ``nnx.merge`` inside jitted steps.
Dropout takes an explicit key (``rng``), so a step is a pure function of (params, batch, key).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sigma_jax.models import backbone

# The attention logit of a masked key: finite, so fully masked rows (padding queries) stay
# NaN-free. Not `numerics.NEG_INF` (-1e30): this baseline keeps the value its reported numbers
# were trained with.
MASKED_LOGIT = -1e9


def _meta(*names):
  # Logical axis names (DESIGN §5); eager sharding off so the model builds without a mesh.
  return dict(out_sharding=names, eager_sharding=False)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when ``rng`` is None or rate is 0."""
  if rng is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _rows(linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """``linear`` over x's last axis, applied to the flattened [rows, D] (``backbone.dense``: the
  weight gradient of a product over several leading axes is slow on XLA:CPU)."""
  return linear(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (-1,))


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with key padding mask."""

  def __init__(self, d_model: int, num_heads: int, dropout_rate: float, *, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.dropout_rate = dropout_rate
    lin = lambda: nnx.Linear(d_model, d_model, kernel_metadata=_meta("embed", "heads"),
                             bias_metadata=_meta("heads"), rngs=rngs)
    self.q, self.k, self.v = lin(), lin(), lin()
    self.o = nnx.Linear(d_model, d_model, kernel_metadata=_meta("heads", "embed"),
                        bias_metadata=_meta("embed"), rngs=rngs)

  def __call__(self, x: jax.Array, key_valid: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Args: x [B, L, D]; key_valid [B, L] bool; rng dropout key or None. Returns [B, L, D]."""
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    q, k, v = split(_rows(self.q, x)), split(_rows(self.k, x)), split(_rows(self.v, x))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))  # [L, L]
    mask = causal[None, None] & key_valid[:, None, None, :]  # [B, 1, L, L]
    att = jax.nn.softmax(jnp.where(mask, att, MASKED_LOGIT), axis=-1)
    att = dropout(att, self.dropout_rate, rng)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, l, -1)  # [B, L, D]
    return _rows(self.o, out)


class Block(nnx.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

  def __init__(self, d_model: int, num_heads: int, dropout_rate: float, *, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.ln1 = nnx.LayerNorm(d_model, epsilon=1e-8, scale_metadata=_meta("norm"),
                             bias_metadata=_meta("norm"), rngs=rngs)
    self.attn = CausalSelfAttention(d_model, num_heads, dropout_rate, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, epsilon=1e-8, scale_metadata=_meta("norm"),
                             bias_metadata=_meta("norm"), rngs=rngs)
    # SASRec keeps the FFN at width D (its point-wise Conv1d layers).
    self.ff1 = nnx.Linear(d_model, d_model, kernel_metadata=_meta("embed", "mlp"),
                          bias_metadata=_meta("mlp"), rngs=rngs)
    self.ff2 = nnx.Linear(d_model, d_model, kernel_metadata=_meta("mlp", "embed"),
                          bias_metadata=_meta("embed"), rngs=rngs)

  def __call__(self, x: jax.Array, key_valid: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Args: x [B, L, D]; key_valid [B, L] bool; rng or None. Returns [B, L, D]."""
    r = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
    x = x + dropout(self.attn(self.ln1(x), key_valid, r[0]), self.dropout_rate, r[1])
    h = dropout(jax.nn.relu(_rows(self.ff1, self.ln2(x))), self.dropout_rate, r[2])
    return x + dropout(_rows(self.ff2, h), self.dropout_rate, r[3])


class SASRec(nnx.Module):
  """Causal transformer over item-id sequences, scoring the next item against every item.

  Attributes:
    num_items: N (real items; the table has N+1 rows).
    max_len: L, longest input sequence (size of the positional table).
  """

  def __init__(self, num_items: int, *, d_model: int = 64, num_blocks: int = 2,
               num_heads: int = 1, max_len: int = 20, dropout_rate: float = 0.5,
               rngs: nnx.Rngs):
    self.num_items = num_items
    self.max_len = max_len
    self.d_model = d_model
    self.dropout_rate = dropout_rate
    init = nnx.initializers.normal(stddev=d_model ** -0.5)
    self.item_table = nnx.Param(init(rngs.params(), (num_items + 1, d_model)),
                                **_meta("item", "embed"))  # [N+1, D]
    self.pos_table = nnx.Param(init(rngs.params(), (max_len, d_model)),
                               **_meta("length", "embed"))  # [L, D]
    self.blocks = nnx.List([Block(d_model, num_heads, dropout_rate, rngs=rngs)
                            for _ in range(num_blocks)])
    self.final_ln = nnx.LayerNorm(d_model, epsilon=1e-8, scale_metadata=_meta("norm"),
                                  bias_metadata=_meta("norm"), rngs=rngs)

  def __call__(self, items: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Encodes left-padded item sequences.

    Args:
      items: [B, L'] int 0-based items, PAD_ITEM (-1) for padding, newest last; L' <= max_len.
      rng: dropout key, or None for evaluation.

    Returns:
      [B, L', D] hidden states; position t summarises items[:, :t+1].
    """
    l = items.shape[1]
    if l > self.max_len:
      raise ValueError(f"sequence length {l} exceeds max_len {self.max_len}")
    valid = items >= 0  # [B, L']
    rows = jnp.where(valid, items + 1, 0)
    table = self.item_table[...]
    x = jnp.take(table, rows, axis=0) * jnp.sqrt(self.d_model).astype(table.dtype)
    # Positions count back from the newest item so the last column always has the same code.
    x = x + self.pos_table[...][self.max_len - l:][None]  # [B, L', D]
    rngs = [None] * (len(self.blocks) + 1) if rng is None else list(
        jax.random.split(rng, len(self.blocks) + 1))
    x = dropout(x, self.dropout_rate, rngs[0]) * valid[..., None]
    for block, r in zip(self.blocks, rngs[1:]):
      x = block(x, valid, r) * valid[..., None]
    return self.final_ln(x)

  def item_embeddings(self) -> jax.Array:
    """The [N, D] item table without the padding row: row i is item i (the frozen v_ID)."""
    return self.item_table[...][1:]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Scores every item: [..., D] -> [..., N] (hidden · item table^T)."""
    return backbone.dense(hidden, self.item_embeddings().T)

  def next_item_logits(self, items: jax.Array) -> jax.Array:
    """Full-ranking scores for the item after each history: [B, L'] -> [B, N]."""
    return self.logits(self(items)[:, -1])


def next_item_loss(model: SASRec, inputs: jax.Array, targets: jax.Array,
                   rng: jax.Array | None = None,
                   positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Full-softmax next-item cross-entropy at every non-padding position.

  Args:
    model: the SASRec module.
    inputs: [B, L] int, left-padded with PAD_ITEM.
    targets: [B, L] int, the item after each input position; PAD_ITEM where there is none.
    rng: dropout key or None.
    positions: optional [P] int flat indices into the B*L positions to score, -1 for unused
      slots. The [.., N] logits dominate the cost and most positions of short histories are
      padding, so scoring only the listed ones is several times cheaper; the result is the same
      as without it when every valid target is listed.

  Returns:
    (mean loss over valid positions, {'loss', 'num_targets'}).
  """
  hidden = model(inputs, rng)  # [B, L, D]
  if positions is None:
    h, t = hidden, targets  # [B, L, D], [B, L]
  else:
    safe = jnp.maximum(positions, 0)
    h = hidden.reshape(-1, hidden.shape[-1])[safe]  # [P, D]
    t = jnp.where(positions >= 0, targets.reshape(-1)[safe], -1)  # [P]
  logits = model.logits(h).astype(jnp.float32)  # [..., N]
  mask = t >= 0
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1)
  loss = jnp.sum(jnp.where(mask, logz - tgt, 0.0)) / n
  return loss, {"loss": loss, "num_targets": mask.sum()}
