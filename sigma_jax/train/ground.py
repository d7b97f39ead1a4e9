"""Grounding: the text tower's training step and inputs (the ``ground`` stage runs them).

The stage (``sigma_jax.stages.ground``) trains the dual-tower alignment encoder and writes
grounded item embeddings. Artifacts in ``WORKDIR/ground``: ``item_text_emb.npy`` [N, E]
(grounded, from the step with the best validation pair recall), ``raw_text_emb.npy`` [N, E] (TF-IDF + PCA, un-grounded: the
`sigma_no_grounding` ablation), ``report.json`` (pair Recall@10 before and after grounding),
``metrics.jsonl``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from sigma_jax import checkpoint, distributed, parallel, utils, workdir as wd
from sigma_jax.data import text
from sigma_jax.models import grounding
from sigma_jax.train import optim

# The model.* fields that decide the text tower's parameter shapes: a backbone that starts from
# the tower (sft.init='grounded') must agree with the ground stage's recipe on each of them.
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "qk_norm", "tie_embeddings")


def load_item_id_embeddings(workdir: str, num_items: int) -> np.ndarray:
  """The frozen `v_ID` table written by the ``collab`` stage."""
  path = wd.require(workdir, wd.COLLAB_ITEM_EMB, "collab")
  emb = np.load(path)
  if emb.ndim != 2 or emb.shape[0] != num_items:
    raise ValueError(f"{path} has shape {emb.shape}; expected [{num_items}, d]")
  return emb.astype(np.float32)


def item_text_tokens(tok: text.TextTokenizer, items, max_len: int) -> tuple[np.ndarray, ...]:
  """[N, T] ids of each item's text followed by <|end|> (the pooled position), and the mask."""
  ids, mask = tok.encode_batch([it.text for it in items], max_len - 1)
  end = np.full((len(items), 1), tok.special[text.END], np.int32)
  ids = np.concatenate([ids, np.zeros_like(end)], axis=1)
  lengths = mask.sum(1)
  ids[np.arange(len(items)), lengths] = end[:, 0]  # right after the last real token
  mask = ids != text.PAD
  return ids, mask


def heldout_pairs(hist: np.ndarray, target: np.ndarray) -> np.ndarray:
  """(newest history item, target) pairs: collaborative relations never seen in training."""
  p = np.stack([hist[:, -1], target], axis=1).astype(np.int64)
  return p[(p[:, 0] >= 0) & (p[:, 0] != p[:, 1])]


def _model_cfg(cfg, vocab_size: int):
  m = cfg.model.copy_and_resolve_references()
  m.vocab_size = int(vocab_size)
  return m


def make_train_step(graphdef, tx, v_id, tau: float, kd_weight: float, mesh, rules, state_sh,
                    batch_sh):
  """Jitted ``step(state, batch) -> (state, metrics)`` of the grounding loss; state is donated.

  ``state`` is {'params', 'opt', 'step', 'best_emb'} with shardings ``state_sh``; ``batch`` is
  {'tokens' [2B, T], 'mask' [2B, T], 'items' [2B]} with shardings ``batch_sh``; ``v_id`` [N, D]
  is the L2-normalised frozen ID table.
  """
  def loss_fn(p, batch):
    v_text = nnx.merge(graphdef, p)(batch["tokens"], batch["mask"])
    return grounding.grounding_loss(v_text, v_id[batch["items"]], batch["items"], tau,
                                    kd_weight)

  def train_step(st, batch):
    with parallel.activation_sharding(mesh, rules):
      (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"], batch)
    updates, opt = tx.update(grads, st["opt"], st["params"])
    metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(st, params=optax.apply_updates(st["params"], updates), opt=opt,
                step=st["step"] + 1), metrics

  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=0)


def make_encoder(graphdef, ids: np.ndarray, mask: np.ndarray, chunk: int, mesh,
                 rules) -> Callable[[nnx.State], np.ndarray]:
  """``embed(params) -> [N, E]``: every item's text through the tower, ``chunk`` items a call.

  Chunks have one fixed shape (the last is padded), so the encoder compiles once; each process
  feeds its rows of a chunk and gets the whole chunk back.
  """
  encode = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m),
                   out_shardings=parallel.replicated(mesh))

  def embed(params) -> np.ndarray:
    out = []
    for s in range(0, len(ids), chunk):
      t, m = ids[s:s + chunk], mask[s:s + chunk]
      pad = chunk - len(t)
      t, m = np.pad(t, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)), constant_values=True)
      rows = distributed.host_rows(chunk)
      batch = parallel.shard_batch({"t": t[rows], "m": m[rows]}, mesh, rules)
      out.append(np.asarray(encode(params, batch["t"], batch["m"]))[:chunk - pad])
    return np.concatenate(out)
  return embed


def tower_recipe(workdir: str) -> dict:
  """The finished ground stage's recipe (``WORKDIR/ground/recipe.json``): the config its tower
  was trained under. FileNotFoundError when the stage has not finished."""
  if not wd.is_done(workdir, "ground"):
    raise FileNotFoundError(f"{wd.stage_dir(workdir, 'ground')} is not finished: run the "
                            "'ground' stage first (sft.init='grounded' starts from its tower)")
  path = wd.recipe_path(workdir, "ground")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the ground stage's tower shape is unknown; "
                            "re-run the 'ground' stage")
  return utils.read_json(path)


def tower_shape_mismatches(model_cfg, recipe: dict) -> list[str]:
  """'model.F: tower V1, here V2' for each ``SHAPE_FIELDS`` field where ``model_cfg`` differs
  from the ground stage's ``recipe``."""
  out = []
  for f in SHAPE_FIELDS:
    key = f"model.{f}"
    if key in recipe and recipe[key] != model_cfg[f]:
      out.append(f"{key}: text tower {recipe[key]!r}, here {model_cfg[f]!r}")
  return out


def load_tower_backbone(cfg, workdir: str, spm_size: int, mesh) -> tuple[nnx.State, int]:
  """The ground stage's text-tower decoder: the one behind ``item_text_emb.npy``.

  That is ``WORKDIR/ground/tower`` at the stage's best-validation step. A ground stage run
  before ``tower/`` was written has only its training checkpoint: the tower at the end of
  training is used then (a warning says so). The tower is rebuilt with the model fields of the
  stage's recipe, so a tower of another shape than ``cfg.model`` still loads (and the caller's
  shape check names the difference).

  Args:
    cfg: the run's config (its ``model`` fills fields the recipe lacks).
    workdir: a work directory whose ground stage has finished.
    spm_size: the SentencePiece vocabulary (the tower's vocabulary).
    mesh: where the restored arrays go (sharded by their logical axes).

  Returns:
    (the tower's ``backbone`` parameter State, the step it was saved at).
  """
  recipe = tower_recipe(workdir)
  mcfg = _model_cfg(cfg, spm_size)
  for f in SHAPE_FIELDS:
    if f"model.{f}" in recipe:
      mcfg[f] = recipe[f"model.{f}"]
  emb = np.load(wd.require(workdir, wd.GROUND_TEXT_EMB, "ground"), mmap_mode="r")
  rules = cfg.axis_rules
  abstract = nnx.split(nnx.eval_shape(
      lambda: grounding.TextTower(mcfg, int(emb.shape[1]), rngs=nnx.Rngs(0))))[1]
  param_sh = parallel.state_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract, param_sh)
  tower_dir = wd.path(workdir, wd.GROUND_TOWER)
  if os.path.isdir(tower_dir):
    best = utils.read_json(wd.done_marker(workdir, "ground")).get("best_step")
    with checkpoint.Checkpointer(tower_dir, max_to_keep=1, async_save=False) as ckpt:
      if best is None or int(best) not in ckpt.all_steps():
        raise FileNotFoundError(f"{tower_dir} lacks the best step {best} of the ground stage "
                                f"(it has {ckpt.all_steps()}); re-run the 'ground' stage")
      step, state, _ = ckpt.restore(params["backbone"], step=int(best))
    return state, int(step)
  logging.warning("%s is missing (a ground stage run before it was written): starting from the "
                  "tower at the end of grounding, not at its best-validation step", tower_dir)
  g = cfg.ground
  tx, _ = optim.make_optimizer(g.learning_rate, g.warmup_steps, max(1, int(g.steps)),
                               g.weight_decay)
  opt_sh = parallel.optimizer_shardings(tx, params, param_sh, mesh)
  opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                     jax.eval_shape(tx.init, params), opt_sh)
  repl = parallel.replicated(mesh)
  target = {"params": params, "opt": opt,
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=repl),
            "best_emb": jax.ShapeDtypeStruct(emb.shape, np.float32, sharding=repl)}
  directory = wd.ckpt_dir(workdir, "ground")
  with checkpoint.Checkpointer(directory, max_to_keep=2, async_save=False) as ckpt:
    restored = ckpt.restore(target)
  if restored is None:
    raise FileNotFoundError(f"{directory} has no checkpoint: run the 'ground' stage first")
  step, state, _ = restored
  return state["params"]["backbone"], int(step)
