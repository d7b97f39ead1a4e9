"""Pretraining (the optional ``pretrain`` stage): a causal LM over item texts and instructions.

A from-scratch backbone (the CPU default) knows no words when grounding starts; this stage
teaches it the catalogue's language first, so the grounding text tower and the SFT backbone start
from the same pretrained decoder (DESIGN §2). It is off by default (not in the pipeline's default stages);
run it with ``--config.stages=data,text_tokenizer,collab,pretrain,ground,tokenize,sft,eval``.

Corpus: every item's text (title, categories, brand, tags) followed by ``<|end|>``, plus every
instruction phrasing repeated ``pretrain.template_repeats`` times. A random
``pretrain.heldout_share`` of the items is held out and its next-token loss is reported before and
after training. Item texts are catalogue metadata, not interactions, so using them leaks nothing
about validation or test targets.

Outputs under ``workdir/pretrain/``:
  ckpt/          Orbax checkpoints of (params, optimizer, step) — resume after a kill
  backbone/      the final decoder parameters (Orbax), read by ``load_into``
  metrics.jsonl  loss, gradient norm and tokens/s every ``log_every`` steps
  report.json    held-out LM loss before and after, steps, corpus size

Which later stages use it is ``pretrain.use``: ``auto`` (whenever ``backbone/`` exists),
``always`` (an error when it does not) or ``never``; for SFT only under ``sft.init='auto'``
(``'pretrain'`` always loads it, ``'scratch'`` and ``'grounded'`` never do).
"""
from __future__ import annotations

import os

import jax
import numpy as np
import optax
from flax import nnx

from sigma_jax import checkpoint, distributed, parallel, workdir as wd
from sigma_jax.data import loader, prompts, tasks, text
from sigma_jax.models import backbone

USE_CHOICES = ("auto", "always", "never")


def corpus(ds: loader.Dataset, tok: text.TextTokenizer, max_len: int, template_repeats: int,
           heldout_share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token ids of the training corpus and of the held-out item texts.

  Returns:
    (train [M, T] int32, heldout [H, T] int32, train_is_item [M] bool); each row is a text's
    pieces, then ``<|end|>``, right-padded with ``text.PAD``.
  """
  if max_len < 2:
    raise ValueError(f"pretrain.max_len={max_len}: need at least one text token and <|end|>")
  item_texts = [it.text for it in ds.raw.items]
  templates = tasks.all_template_texts() + [prompts.HISTORY_VERB]
  rng = np.random.default_rng(seed)
  heldout = np.zeros(len(item_texts), bool)
  n_held = int(round(heldout_share * len(item_texts)))
  heldout[rng.permutation(len(item_texts))[:n_held]] = True

  def encode(texts):
    ids, mask = tok.encode_batch(texts, max_len - 1)
    ids = np.concatenate([ids, np.full((len(texts), 1), text.PAD, np.int32)], axis=1)
    ids[np.arange(len(texts)), mask.sum(1)] = tok.special[text.END]
    return ids.astype(np.int32)

  train_texts = [t for t, h in zip(item_texts, heldout) if not h]
  train = encode(train_texts + templates * int(template_repeats))
  is_item = np.arange(len(train)) < len(train_texts)
  held = encode([t for t, h in zip(item_texts, heldout) if h]) if n_held else np.zeros(
      (0, max_len), np.int32)
  return train, held, is_item


def lm_batch_loss(graphdef, params, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token loss of right-padded rows [B, T]; returns (loss, number of targets)."""
  mask = ids != text.PAD
  hidden = nnx.merge(graphdef, params)(ids, attn_mask=mask)
  logits = nnx.merge(graphdef, params).logits(hidden)[:, :-1]
  weights = mask[:, 1:]
  return backbone.lm_loss(logits, ids[:, 1:], weights), weights.sum()


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The row indices of step ``step``: a fresh permutation per epoch, a pure function of
  (seed, step), so a resumed run sees the same batches."""
  per_epoch = max(1, num_rows // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  if num_rows < batch_size:
    order = np.resize(order, batch_size)
  return order[i * batch_size:(i + 1) * batch_size]


def make_train_step(graphdef, tx, mesh, rules, state_sh, ids_sh):
  """Jitted ``step(state, ids [B, T]) -> (state, metrics)`` of the LM loss; state is donated."""
  def train_step(st, ids):
    with parallel.activation_sharding(mesh, rules):
      (loss, n), grads = jax.value_and_grad(
          lambda q: lm_batch_loss(graphdef, q, ids), has_aux=True)(st["params"])
    updates, opt = tx.update(grads, st["opt"], st["params"])
    return (dict(st, params=optax.apply_updates(st["params"], updates), opt=opt,
                 step=st["step"] + 1),
            {"loss": loss, "tokens": n, "grad_norm": optax.tree.norm(grads)})

  return jax.jit(train_step, in_shardings=(state_sh, ids_sh),
                 out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0)


def make_heldout_loss(graphdef, held: np.ndarray, batch_size: int, mesh, rules, param_sh):
  """``loss(params) -> float | None``: the mean next-token loss over the held-out rows."""
  ids_sh = parallel.batch_sharding(mesh, 2, rules)
  eval_fn = jax.jit(lambda q, ids: lm_batch_loss(graphdef, q, ids),
                    in_shardings=(param_sh, ids_sh), out_shardings=parallel.replicated(mesh))

  def loss(params) -> float | None:
    if not len(held):
      return None
    total, count = 0.0, 0
    for s in range(0, len(held), batch_size):
      rows = held[s:s + batch_size]
      pad = batch_size - len(rows)  # fixed shape: one compilation; padded rows have no targets
      rows = np.concatenate([rows, np.full((pad, rows.shape[1]), text.PAD, np.int32)])
      rows = rows[distributed.host_rows(batch_size)]
      value, n = eval_fn(params, parallel.shard_batch({"ids": rows}, mesh, rules)["ids"])
      total, count = total + float(value) * int(n), count + int(n)
    return total / max(1, count)
  return loss


def model_config(cfg, vocab_size: int):
  m = cfg.model.copy_and_resolve_references()
  m.vocab_size = int(vocab_size)
  m.max_len = int(cfg.pretrain.max_len)
  return m


def backbone_dir(workdir: str) -> str:
  return wd.path(workdir, wd.PRETRAIN_BACKBONE)


def resolve(cfg, workdir: str, use: str | None = None) -> str | None:
  """The pretrained backbone directory the later stages should start from, or None.

  ``use`` overrides ``pretrain.use`` (``sft.init='pretrain'`` asks for ``'always'``).

  Raises:
    FileNotFoundError: ``use`` is ``'always'`` and the stage has not written its backbone.
  """
  use = str(cfg.pretrain.use if use is None else use)
  if use not in USE_CHOICES:
    raise ValueError(f"pretrain.use={use!r}; choose from {USE_CHOICES}")
  path = backbone_dir(workdir)
  exists = wd.is_done(workdir, "pretrain") and os.path.isdir(path)
  if use == "never" or (use == "auto" and not exists):
    return None
  if not exists:
    raise FileNotFoundError(f"pretrain.use='always' (or sft.init='pretrain') but {path} is "
                            "missing: run the 'pretrain' stage first (add it to --config.stages)")
  return path


def load_into(params, workdir: str, cfg, spm_size: int,
              use: str | None = None) -> tuple[nnx.State, bool]:
  """Overwrites a backbone's parameters with the pretrained ones (when ``resolve`` finds them).

  Args:
    params: a fresh ``Decoder`` parameter State, sharded. Its vocabulary may be larger than the
      pretrained one (the SFT backbone adds SID tokens after the SentencePiece pieces): the first
      ``spm_size`` rows of ``embedding`` are copied and the new rows keep their initialisation.
    workdir, cfg: the run.
    spm_size: the SentencePiece vocabulary of the run's text tokenizer (the pretrained one).
    use: overrides ``pretrain.use`` (see ``resolve``).

  Returns:
    (params, whether pretrained weights were loaded).
  """
  path = resolve(cfg, workdir, use)
  if path is None:
    return params, False
  pre_cfg = model_config(cfg, spm_size)
  abstract = nnx.split(nnx.eval_shape(lambda: backbone.Decoder(pre_cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)[1]
  with checkpoint.Checkpointer(path, max_to_keep=1, async_save=False) as ck:
    restored = ck.restore(abstract)
  if restored is None:
    raise FileNotFoundError(f"{path} holds no readable checkpoint; run 'pretrain' again")
  return backbone.copy_params(params, restored[1], source="pretrained backbone",
                              hint=" (did model.* change since pretrain?)"), True
