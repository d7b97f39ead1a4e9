"""The collaborative model (SASRec): trained by the ``collab`` stage, its item table is the frozen
v_ID that grounding and SFT read.

Protocol (TIGER's, DESIGN §3): one training example per user — the last ``max_len + 1`` items of
the user's training part, inputs and targets shifted by one, full-softmax loss at every position.
Validation and test rank ALL N items by ``last hidden state · item table^T``; items already in the
history are ranked last when ``cfg.dataset.exclude_history`` (no item repeats within a user's
sequence on these datasets), else they compete like any other (TIGER ranks all items). The
epoch is selected on validation only; test is evaluated once, at the selected epoch.

Outputs under ``workdir/collab/``:
  ckpt/           Orbax checkpoints, one per epoch (resume after a kill)
  metrics.jsonl   one JSON line per epoch (train loss, validation metrics when evaluated)
  item_emb.npy    [N, D] float32 item table of the best-validation epoch
  result.json     {"best_epoch", "select_metric", "validation", "test", ...}
A run whose ``result.json`` exists is not run again.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sigma_jax import utils, workdir as wd
from sigma_jax.checkpoint import Checkpointer
from sigma_jax.data.splits import PAD_ITEM, Splits, left_pad
from sigma_jax.eval.metrics import ranking_metrics
from sigma_jax.models.sasrec import SASRec, next_item_loss
from sigma_jax.train import loop

KS = (1, 5, 10, 20)
EVAL_BATCH = 1024


def build_examples(train_seqs: list, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """One example per user with at least two training items.

  Args:
    train_seqs: U arrays of 0-based item indices, oldest first.
    max_len: L, the input length.

  Returns:
    (inputs [M, L] int32, targets [M, L] int32), both left-padded with PAD_ITEM;
    targets[:, t] is the item after inputs[:, t].
  """
  windows = [np.asarray(s)[-(max_len + 1):] for s in train_seqs if len(s) >= 2]
  inputs = left_pad([w[:-1] for w in windows], max_len)
  targets = left_pad([w[1:] for w in windows], max_len)
  return inputs, targets


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int):
  """The batches of example indices of one epoch, a pure function of (seed, epoch).

  Returns:
    A grain MapDataset; element ``step`` is that step's [<=batch_size] int index array.
  """
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
  return (grain.MapDataset.range(num_examples).shuffle(seed=epoch_seed)
          .batch(batch_size, drop_remainder=False))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  # Fixed batch shapes: the last, short batch is padded with all-PAD rows (no targets).
  if len(x) == rows:
    return x
  pad = np.full((rows - len(x),) + x.shape[1:], PAD_ITEM, dtype=x.dtype)
  return np.concatenate([x, pad])


def make_batch(inputs: np.ndarray, targets: np.ndarray, batch_size: int,
               bucket: int = 256) -> dict:
  """Pads a batch to ``batch_size`` rows and lists its target positions.

  Args:
    inputs, targets: [b <= batch_size, L] int.
    batch_size: B.
    bucket: the number of listed positions P is rounded up to a multiple of this, so only a few
      shapes are ever compiled.

  Returns:
    {'inputs' [B, L], 'targets' [B, L], 'positions' [P] flat indices of targets != PAD, -1 after}.
  """
  inputs, targets = _pad_rows(inputs, batch_size), _pad_rows(targets, batch_size)
  pos = np.flatnonzero(targets.reshape(-1) >= 0).astype(np.int32)
  p = max(bucket, -(-len(pos) // bucket) * bucket)
  positions = np.full((min(p, targets.size),), -1, np.int32)
  positions[:len(pos)] = pos
  return {"inputs": inputs, "targets": targets, "positions": positions}


@functools.lru_cache(maxsize=8)
def make_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  """Adam(W) with b2 = 0.98 as in the original SASRec; cached so equal settings share jit caches."""
  if weight_decay > 0:
    return optax.adamw(learning_rate, b1=0.9, b2=0.98, weight_decay=weight_decay)
  return optax.adam(learning_rate, b1=0.9, b2=0.98)


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef, tx):
  """Returns jitted ``train_step(state, batch, base_rng) -> (state, metrics)``.

  ``state`` is {'params', 'opt_state', 'step'} and is donated; ``batch`` is {'inputs' [B, L],
  'targets' [B, L], 'positions' [P]} as made by ``make_batch``. The dropout key is
  ``fold_in(base_rng, state['step'])``, so a resumed run draws the same keys.
  """
  def train_step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state["step"])

    def loss_fn(params):
      return next_item_loss(nnx.merge(graphdef, params), batch["inputs"], batch["targets"], rng,
                            batch["positions"])
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(aux, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
  return jax.jit(train_step, donate_argnames=("state",))


def build_model(num_items: int, ccfg, seed: int) -> SASRec:
  """The SASRec described by ``cfg.collab`` (cheap under ``nnx.eval_shape`` or ``jax.jit``)."""
  return SASRec(num_items, d_model=ccfg.d_model, num_blocks=ccfg.num_blocks,
                num_heads=ccfg.num_heads, max_len=int(ccfg.max_len), dropout_rate=ccfg.dropout,
                rngs=nnx.Rngs(seed))


@jax.jit
def _copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def mask_history(scores: jax.Array, hist: jax.Array) -> jax.Array:
  """Sets the scores of the items in each row's history to NEG_INF.

  Args:
    scores: [B, N] scores over all items.
    hist: [B, H] int item indices, PAD_ITEM (< 0) for padding.

  Returns:
    [B, N] scores, history items at the lowest finite value (so they rank last).
  """
  rows = jnp.arange(scores.shape[0])[:, None]  # [B, 1]
  cols = jnp.maximum(hist, 0)  # [B, H]
  low = jnp.asarray(jnp.finfo(scores.dtype).min, scores.dtype)
  # Padding slots scatter +inf with .min, which leaves their column unchanged.
  return scores.at[rows, cols].min(jnp.where(hist >= 0, low, jnp.inf).astype(scores.dtype))


@functools.lru_cache(maxsize=8)
def make_topk_fn(graphdef, k: int, exclude_history: bool = False):
  """Returns jitted ``topk(params, hist [B, L]) -> [B, k]`` item indices ranked over all N items.

  With ``exclude_history`` the items of the history itself are ranked last (see ``evaluate``).
  """
  def topk(params, hist):
    scores = nnx.merge(graphdef, params).next_item_logits(hist)  # [B, N]
    if exclude_history:
      scores = mask_history(scores, hist)
    return jax.lax.top_k(scores, k)[1]
  return jax.jit(topk)


def evaluate(topk_fn, params, hist: np.ndarray, target: np.ndarray, max_len: int,
             num_items: int) -> dict:
  """Full-ranking metrics for histories ``hist`` [U, H] against ``target`` [U].

  The ranking is over every item; ``topk_fn`` decides whether history items may be returned
  (``make_topk_fn(..., exclude_history=True)`` excludes the last ``max_len`` of them, the ones the
  model sees).
  """
  return ranking_metrics(ranked_lists(topk_fn, params, hist, max_len), target, KS,
                         num_items=num_items)


def ranked_lists(topk_fn, params, hist: np.ndarray, max_len: int) -> np.ndarray:
  """[U, max(KS)] item indices, best first, for histories ``hist`` [U, H] (the model reads the
  last ``max_len`` items of each)."""
  hist = np.asarray(hist)[:, -max_len:]
  ranked = []
  rows = max(1, min(EVAL_BATCH, len(hist)))
  for start in range(0, len(hist), rows):
    chunk = hist[start:start + rows]
    out = np.asarray(topk_fn(params, _pad_rows(chunk, rows)))
    ranked.append(out[:len(chunk)])
  return np.concatenate(ranked) if ranked else np.zeros((0, max(KS)), np.int32)


def _state_fns(n: int, ccfg, seed: int, tx):
  """(init_state, its abstract tree on one device, that device) of a collab run.

  The state is {'train': {'params', 'opt_state', 'step'}, 'best_params'}. One explicit device,
  so fresh and restored states have the same sharding (no recompiles).
  """
  def init_state():
    params = nnx.split(build_model(n, ccfg, seed), nnx.Param)[1]
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    # best_params is a separate buffer: the live params are donated to every train step.
    return {"train": state, "best_params": jax.tree.map(jnp.copy, params)}

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init_state))
  return init_state, abstract, device


def _graphdef(n: int, ccfg, seed: int):
  """The SASRec graph definition, without materialising parameters."""
  return nnx.split(nnx.eval_shape(lambda: build_model(n, ccfg, seed)), nnx.Param)[0]


def train_collab(cfg, splits: Splits, workdir: str, *, progress: bool = True,
                 max_epochs_this_run: int | None = None) -> dict:
  """Trains (or resumes, or skips) the collaborative model and writes its artifacts.

  Args:
    cfg: the experiment config; reads ``cfg.seed`` and ``cfg.collab`` (d_model, num_blocks,
      num_heads, dropout, max_len, epochs, batch_size, learning_rate, weight_decay, eval_every,
      patience, select_metric).
    splits: leave-one-out splits.
    workdir: the run's work directory; this stage writes under ``workdir/collab``.
    progress: show a tqdm bar.
    max_epochs_this_run: stop (unfinished, resumable) after this many epochs in this call — for
      time-limited jobs; None runs to the end.

  Returns:
    The result dict (as in result.json); {'finished': False, 'epoch': e} when stopped early by
    ``max_epochs_this_run``.
  """
  ccfg = cfg.collab
  select = str(ccfg.select_metric)
  result_path = wd.path(workdir, wd.COLLAB_RESULT)
  if os.path.exists(result_path) and os.path.exists(wd.path(workdir, wd.COLLAB_ITEM_EMB)):
    logging.info("collab: %s exists; stage already finished", result_path)
    return utils.read_json(result_path)
  seed = int(cfg.seed)
  n = splits.num_items
  max_len = int(ccfg.max_len)
  bs = int(ccfg.batch_size)
  inputs, targets = build_examples(splits.train_seqs, max_len)
  num_ex = len(inputs)
  if num_ex == 0:
    raise ValueError("no user has two training items; nothing to train the collab model on")
  steps_per_epoch = math.ceil(num_ex / bs)

  tx = make_optimizer(float(ccfg.learning_rate), float(ccfg.weight_decay))
  init_state, _, device = _state_fns(n, ccfg, seed, tx)
  graphdef = _graphdef(n, ccfg, seed)
  train_step = make_train_step(graphdef, tx)
  exclude = exclude_history(cfg)
  topk_fn = make_topk_fn(graphdef, max(KS), exclude)
  # seed itself initialises the parameters. RBG keys: the train step compiles several times
  # faster than with threefry, whose dropout-mask kernels dominate XLA CPU compile time.
  base_rng = jax.random.key(seed + 1, impl="rbg")
  losses = []  # this epoch's, as device scalars (an epoch is never split by a checkpoint)

  def step_fn(tree, step):
    epoch, i = divmod(step, steps_per_epoch)
    idx = epoch_order(num_ex, bs, seed, epoch + 1)[i]
    state, m = train_step(tree["train"], make_batch(inputs[idx], targets[idx], bs), base_rng)
    losses.append(m["loss"])
    return dict(tree, train=state), m, len(idx)

  def end_of_epoch(tree, meta, m, examples_per_s):
    epoch = meta["step"] // steps_per_epoch
    record = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))),
              "examples_per_s": round(examples_per_s, 1)}
    losses.clear()
    if epoch % ccfg.eval_every == 0 or epoch == ccfg.epochs:
      val = evaluate(topk_fn, tree["train"]["params"], splits.valid_hist, splits.valid_target,
                     max_len, n)
      record["validation"] = val
      if meta["best_value"] is None or val[select] > meta["best_value"]:
        meta["best_value"], meta["best_epoch"] = val[select], epoch
        # Copied: the live params are donated to the next train step.
        tree = dict(tree, best_params=_copy_tree(tree["train"]["params"]))
      tqdm.write(f"collab epoch {epoch}: loss {record['train_loss']:.4f} val {select} "
                 f"{val[select]:.4f} (best {meta['best_value']:.4f} @ {meta['best_epoch']})")
    meta["history"].append(dict(record, step=meta["step"]))
    meta["epoch"] = epoch
    meta["done"] = epoch >= ccfg.epochs or epoch - meta["best_epoch"] >= ccfg.patience
    meta.update(seed=seed, config=ccfg.to_dict(), select_metric=select,
                data_position={"seed": seed, "epoch": epoch + 1, "step": 0})
    return tree, record

  spec = loop.Loop("collab", workdir, int(ccfg.epochs) * steps_per_epoch, steps_per_epoch,
                   steps_per_epoch, progress=progress, local=True,
                   ckpt_number=lambda meta: meta["epoch"],
                   resumed="resumed after epoch {epoch}", postfix=("train_loss",))
  meta = {"step": 0, "epoch": 0, "best_epoch": 0, "best_value": None, "history": [],
          "done": False}
  # One compiled init instead of one dispatch per parameter, on one explicit device, so fresh
  # and restored states (the loop restores into this tree's shardings) compile alike.
  tree = jax.jit(init_state, out_shardings=device)()
  tree, meta, finished = loop.train(
      spec, tree, meta, step_fn, end_of_epoch,
      stop_after=None if max_epochs_this_run is None else max_epochs_this_run * steps_per_epoch)
  if not finished:
    return {"finished": False, "epoch": meta["epoch"]}

  best = meta["best_epoch"]
  val = next(h["validation"] for h in meta["history"] if h["epoch"] == best)
  test = evaluate(topk_fn, tree["best_params"], splits.test_hist, splits.test_target, max_len, n)
  emb = np.asarray(nnx.merge(graphdef, tree["best_params"]).item_embeddings(), dtype=np.float32)
  result = {"best_epoch": best, "select_metric": select, "epochs_run": meta["epoch"],
            "validation": val, "test": test,
            "exclude_history": exclude,
            "protocol": "leave-one-out; one example per user (last max_len+1 training items, "
                        "loss at every position); full ranking over all items, history items "
                        + ("ranked last" if exclude else "not excluded")
                        + "; epoch selected on validation"}
  utils.save_npy(wd.path(workdir, wd.COLLAB_ITEM_EMB), emb)
  utils.write_json(result_path, result)
  return result


def exclude_history(cfg) -> bool:
  """``cfg.dataset.exclude_history``: rank the items of the user's own history last."""
  return bool(cfg.dataset.exclude_history)


def load_best(cfg, num_items: int, workdir: str):
  """(graphdef, best-epoch params, best epoch) of a collab run, read from its newest checkpoint."""
  ccfg, seed = cfg.collab, int(cfg.seed)
  tx = make_optimizer(float(ccfg.learning_rate), float(ccfg.weight_decay))
  _, abstract, _ = _state_fns(num_items, ccfg, seed, tx)
  with Checkpointer(wd.ckpt_dir(workdir, "collab"), max_to_keep=2, local=True) as ckpt:
    restored = ckpt.restore(abstract)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/collab/ckpt holds no checkpoint")
  _, tree, meta = restored
  graphdef = _graphdef(num_items, ccfg, seed)
  return graphdef, tree["best_params"], int(meta["best_epoch"])


def rescore(cfg, splits: Splits, workdir: str) -> dict:
  """Validation and test metrics of a finished collab run under the current ranking protocol.

  For a run whose ``result.json`` was written under another ``dataset.exclude_history``: the
  same best-epoch parameters (read back from the newest checkpoint), ranked as the config now
  says. The epoch is not re-selected (that would need every epoch's parameters); the result
  says under which protocol it was selected. Nothing is written.
  """
  result = utils.read_json(wd.path(workdir, wd.COLLAB_RESULT))
  n, max_len = splits.num_items, int(cfg.collab.max_len)
  graphdef, params, best_epoch = load_best(cfg, n, workdir)
  if best_epoch != int(result["best_epoch"]):
    raise ValueError(f"checkpoint best epoch {best_epoch} != result.json's "
                     f"{result['best_epoch']}")
  exclude = exclude_history(cfg)
  topk_fn = make_topk_fn(graphdef, max(KS), exclude)
  return {"best_epoch": int(result["best_epoch"]),
          "validation": evaluate(topk_fn, params, splits.valid_hist, splits.valid_target,
                                 max_len, n),
          "test": evaluate(topk_fn, params, splits.test_hist, splits.test_target, max_len, n),
          "exclude_history": exclude,
          "epoch_selected_with_exclude_history": bool(result.get("exclude_history", False))}
