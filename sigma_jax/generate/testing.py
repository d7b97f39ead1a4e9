"""Model steps and synthetic catalogues for benchmarks and tests.

`DecoderStep` and `TableStep` are `step_fn`s for `beam.constrained_beam_search` and
`reference.host_beam_search`: the real backbone one token per beam on its KV cache, or a table
lookup standing in for it. `random_decoder` builds a random-init backbone quickly on a CPU;
`synthetic_sids` draws a catalogue of distinct random SIDs. Used by `launch/benchmark.py decode`
and by the tests; nothing in the pipeline calls them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx

from sigma_jax.data import text
from sigma_jax.generate import beam
from sigma_jax.models import backbone as bb


class DecoderStep:
  """`step_fn(params, tokens [B*K], cache, step) -> (logits, cache)` of a split Decoder.

  One token per beam on the KV cache. Without `token_offset`, full-vocabulary logits
  [B*K, V]; with `token_offset` and `width`, the level-`step` code logits [B*K, W] that
  `generator.generate`'s step returns (search with `level_logits=True`).

  With `shared=True` (as `generator.generate`), the first argument is `(params, prompt)`: the
  prefilled prompt `KVCache` [B rows] that the beams share, and the searched cache is each
  beam's own part (`backbone.beam_cache(prompt, L)`), so the search never tiles or reorders
  the prompt. Otherwise the first argument is `params` and the cache the prefilled prompt.
  Equal graphdefs and settings compare equal, so jit reuses compiled programs across instances.
  """

  def __init__(self, graphdef, token_offset=None, width: int | None = None,
               shared: bool = False):
    self.graphdef = graphdef
    self.token_offset = None if token_offset is None else tuple(int(o) for o in token_offset)
    self.width = None if width is None else int(width)
    self.shared = bool(shared)
    if (self.token_offset is None) != (self.width is None):
      raise ValueError("DecoderStep: give both token_offset and width, or neither")

  def _key(self):
    return (self.graphdef, self.token_offset, self.width, self.shared)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, DecoderStep) and other._key() == self._key()

  def __call__(self, state, tokens, cache, step):
    params, prompt = state if self.shared else (state, None)
    model = nnx.merge(self.graphdef, params)
    hidden, cache = model(tokens[:, None], cache=cache, decode=True,
                          shared=prompt)  # [B*K, 1, D]
    if self.token_offset is None:
      return model.logits(hidden)[:, 0], cache  # [B*K, V]
    ids = beam.level_token_ids(self.token_offset, self.width, model.embedding[...].shape[0])
    return model.token_logits(hidden, ids[step])[:, 0], cache  # [B*K, W]


class TableStep:
  """A stand-in model step without a backbone: logits are rows of a fixed table.

  `step_fn(table [R, V], tokens [B*K], cache [B*K], step) -> (table[tokens % R] [B*K, V],
  cache)` (a table of W columns gives a level-code step, for ``level_logits=True``), the cache being one int per row (still reordered by both searches). The decode
  benchmark's `search_only` numbers use it to isolate the search machinery (constraint,
  softmax, top-k, beam bookkeeping, per-step dispatch) from the model.
  """

  def __hash__(self):
    return hash(TableStep)

  def __eq__(self, other):
    return isinstance(other, TableStep)

  def __call__(self, table, tokens, cache, step):
    del step
    return table[tokens % table.shape[0]], cache  # [B*K, V]


def random_decoder(cfg, seed: int):
  """A split random-init Decoder.

  Parameters are drawn in NumPy (fan-in-scaled normals, embedding std 0.02, norm scales 1):
  Flax's initialisers compile one random op per shape, which costs seconds on a small CPU.

  Args:
    cfg: the backbone config (e.g. `configs.base.backbone(size)`), `vocab_size` set.
    seed: seed of the NumPy generator the parameters are drawn from.

  Returns:
    (graphdef, params) with params on the default device.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: bb.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(x.shape, np.float32)
    if "embedding" in name:
      return rng.normal(0, 0.02, x.shape).astype(np.float32)
    # Fan-in = all axes but the output one (q/k/v [D, H, Dh] and o_proj [H, Dh, D] alike).
    fan_in = x.shape[0] if "proj" in name and "o_proj" not in name else int(
        np.prod(x.shape[:-1]))
    return rng.normal(0, fan_in ** -0.5, x.shape).astype(np.float32)

  params = jax.device_put(jax.tree_util.tree_map_with_path(draw, abstract))
  return graphdef, params


def synthetic_sids(rng: np.random.Generator, n: int, sizes: Sequence[int]) -> np.ndarray:
  """`n` distinct uniformly random SIDs.

  Args:
    rng: `np.random.Generator`.
    n: items N (at most prod(sizes)).
    sizes: (C_0, ..., C_{L-1}).

  Returns:
    [N, L] int32 codes, rows in random order.
  """
  total = int(np.prod([float(c) for c in sizes]))
  if n > total:
    raise ValueError(f"{n} distinct SIDs do not fit in {tuple(sizes)} codes")
  # Oversample then deduplicate: O(N log N), unlike a permutation of all prod(sizes) keys.
  keys = np.zeros(0, np.int64)
  while len(keys) < n:
    draw = rng.integers(0, total, size=int(1.2 * (n - len(keys))) + 16, dtype=np.int64)
    keys = np.unique(np.concatenate([keys, draw]))
  keys = rng.permutation(keys)[:n]
  return np.stack(np.unravel_index(keys, tuple(sizes)), axis=1).astype(np.int32)  # [N, L]


class SyntheticTokenizer(text.SidVocab):
  """A stand-in for `data.text.TextTokenizer` without a SentencePiece model.

  The same id layout (`data/text.py`): ids [0, spm_size) are text (0 padding, 1 unknown, 2-5
  the special tokens), then the L·C SID tokens and the D de-duplication codes. `encode` maps
  each whitespace-separated word to a fixed id in [6, spm_size) (a hash), so a text's length
  in tokens is its number of words. Benchmarks use it to build prompts of realistic lengths
  without training a tokenizer.
  """

  def __init__(self, spm_size: int, levels: int, codebook_size: int, dedup_size: int = 0):
    if spm_size < 7:
      raise ValueError(f"spm_size must leave room for the special tokens, got {spm_size}")
    self.spm_size, self.levels = int(spm_size), int(levels)
    self.codebook_size, self.dedup_size = int(codebook_size), int(dedup_size)
    self.special = {s: 2 + i for i, s in enumerate(text.SPECIALS)}

  def encode(self, text_: str) -> list[int]:
    import zlib
    span = self.spm_size - 6
    return [6 + zlib.crc32(w.encode()) % span for w in text_.split()]
