"""Stage ``ground``: trains the dual-tower alignment encoder and writes grounded item embeddings.

Artifacts in ``WORKDIR/ground``: ``item_text_emb.npy`` [N, E] (grounded, from the step with the
best validation pair recall), ``raw_text_emb.npy`` [N, E] (TF-IDF + PCA, un-grounded: the
`sigma_no_grounding` ablation), ``report.json`` (pair Recall@10 before and after grounding),
``metrics.jsonl``.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sigma_jax import checkpoint, distributed, parallel, pipeline, utils
from sigma_jax.data import loader, pairs, text
from sigma_jax.models import grounding
from sigma_jax.train import optim, pretrain


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; the last good checkpoint is left untouched."""


def check_finite(stage: str, pending: list, ckpt) -> None:
  """Raises `NonFiniteLossError` naming the first step whose loss or gradient is NaN or Inf.

  Args:
    stage: the stage name, for the message.
    pending: (step, metrics) pairs not checked yet, metrics as device scalars; emptied when all
      are finite. Training code calls this before every checkpoint save (and log line), so every
      step since the last check is covered, not only the logged ones.
    ckpt: the stage's `Checkpointer` (asked for the last good step only on failure).
  """
  for step, m in jax.device_get(pending):
    bad = {k: float(v) for k, v in m.items() if not np.all(np.isfinite(v))}
    if bad:
      raise NonFiniteLossError(
          f"stage {stage}, step {step}: non-finite loss or gradient {bad}; training stopped, "
          f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
  pending.clear()


def load_item_id_embeddings(workdir: str, num_items: int) -> np.ndarray:
  """The frozen `v_ID` table written by the ``collab`` stage."""
  path = os.path.join(workdir, "collab", "item_emb.npy")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the 'collab' stage before 'ground'")
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


@pipeline.stage("ground")
def run_ground(cfg, workdir: str) -> dict:
  g = cfg.ground
  seed = int(cfg.seed)
  out_dir = os.path.join(workdir, "ground")
  ds = loader.load_dataset(cfg, workdir)
  n = ds.num_items
  tok = text.TextTokenizer(text.model_path(workdir))
  v_id_host = np.asarray(grounding.l2_normalize(jnp.asarray(load_item_id_embeddings(workdir, n))))
  ids, mask = item_text_tokens(tok, ds.raw.items, int(cfg.text.max_item_tokens))
  pools = pairs.build_pools(ds, g, seed)
  val_pairs = heldout_pairs(ds.splits.valid_hist, ds.splits.valid_target)
  test_pairs = heldout_pairs(ds.splits.test_hist, ds.splits.test_target)

  mesh = parallel.make_mesh(cfg.mesh)
  rules = cfg.axis_rules
  model_cfg = _model_cfg(cfg, tok.spm_size)
  graphdef, params = parallel.init_sharded(
      lambda: grounding.TextTower(model_cfg, int(g.out_dim), rngs=nnx.Rngs(seed)), mesh, rules)
  # The text tower starts from the pretrain stage's decoder when there is one (pretrain.use).
  params["backbone"], pretrained = pretrain.load_into(params["backbone"], workdir, cfg,
                                                      tok.spm_size)
  tx, _ = optim.make_optimizer(g.learning_rate, g.warmup_steps, g.steps, g.weight_decay)
  repl = parallel.replicated(mesh)
  state, state_sh = parallel.train_state(tx, params, mesh, rules)
  state_sh["best_emb"] = repl
  state["best_emb"] = parallel.put_replicated(np.zeros((n, int(g.out_dim)), np.float32), mesh)
  batch_sh = {k: parallel.batch_sharding(mesh, nd, rules)
              for k, nd in (("tokens", 2), ("mask", 2), ("items", 1))}

  v_id = parallel.put_replicated(v_id_host, mesh)
  step_fn = make_train_step(graphdef, tx, v_id, float(g.tau), float(g.kd_weight), mesh, rules,
                            state_sh, batch_sh)
  encode = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m), out_shardings=repl)

  def embed_all(p) -> np.ndarray:
    chunk = int(g.encode_batch)
    out = []
    for s in range(0, n, chunk):
      t, m = ids[s:s + chunk], mask[s:s + chunk]
      pad = chunk - len(t)  # fixed shape: one compilation
      t, m = np.pad(t, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)), constant_values=True)
      rows = distributed.host_rows(chunk)
      batch = parallel.shard_batch({"t": t[rows], "m": m[rows]}, mesh, rules)
      out.append(np.asarray(encode(p, batch["t"], batch["m"]))[:chunk - pad])
    return np.concatenate(out)

  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=2)
  meta = {"step": 0, "best_step": None, "best_val": -1.0, "before": None}
  restored = ckpt.restore(state)  # restores into the shapes and shardings of `state`
  if restored is not None:
    _, state, meta = restored
    logging.info("ground: resumed at step %d", meta["step"])
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  # Lines logged after the restored checkpoint (then killed) are dropped; they will be re-logged.
  utils.truncate_jsonl(metrics_path, lambda r: r["step"] <= meta["step"])

  if meta["before"] is None:
    emb0 = embed_all(state["params"])
    meta["before"] = {"untrained_text_tower": {
        "validation": grounding.pair_recall_at_k(emb0, val_pairs),
        "test": grounding.pair_recall_at_k(emb0, test_pairs)}}

  steps, batch_pairs = int(g.steps), int(g.batch_pairs)
  bar = tqdm(total=steps, initial=meta["step"], desc="ground", dynamic_ncols=True,
             disable=not cfg.get("progress", True))
  t0, last_log = time.time(), meta["step"]
  pending = []  # (step, metrics) not yet checked for NaN/Inf
  try:
    while meta["step"] < steps:
      step = meta["step"]
      pr = pairs.sample_pairs(pools, batch_pairs, seed, step)
      items = np.concatenate([pr[:, 0], pr[:, 1]]).astype(np.int32)
      items = items[distributed.host_rows(len(items))]  # this process's rows only
      batch = parallel.shard_batch({"tokens": ids[items], "mask": mask[items], "items": items},
                                   mesh, rules)
      state, m = step_fn(state, batch)
      meta["step"] = step + 1
      pending.append((meta["step"], m))
      bar.update(1)
      done = meta["step"] == steps
      save = meta["step"] % int(g.ckpt_every) == 0 or done
      if meta["step"] % int(g.log_every) == 0 or save:
        check_finite("ground", pending, ckpt)
      if meta["step"] % int(g.log_every) == 0 or done:
        m = jax.device_get(m)
        rate = (meta["step"] - last_log) / max(1e-9, time.time() - t0)
        t0, last_log = time.time(), meta["step"]
        rec = {"step": meta["step"], **{k: float(v) for k, v in m.items()},
               "pairs_per_s": rate * batch_pairs}
        if meta["step"] % int(g.eval_every) == 0 or done:
          emb = embed_all(state["params"])
          rec["val_pair_recall@10"] = grounding.pair_recall_at_k(emb, val_pairs)
          if rec["val_pair_recall@10"] > meta["best_val"]:
            meta["best_val"], meta["best_step"] = rec["val_pair_recall@10"], meta["step"]
            state["best_emb"] = parallel.put_replicated(emb, mesh)
        utils.append_jsonl(metrics_path, rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}")
      if save:
        ckpt.save(meta["step"], state, meta)
  finally:
    bar.close()
    ckpt.wait()

  best = np.asarray(state["best_emb"])
  raw = grounding.raw_text_embeddings(ids, mask & (ids != tok.special[text.END]), tok.spm_size,
                                      int(g.out_dim))
  vid = v_id_host
  report = {
      "metric": "pair recall@10: retrieve the held-out next item (validation / test target) "
                "from the newest history item among all items, by cosine",
      "num_pairs": {"validation": int(len(val_pairs)), "test": int(len(test_pairs))},
      "before": dict(meta["before"], raw_tfidf_text={
          "validation": grounding.pair_recall_at_k(raw, val_pairs),
          "test": grounding.pair_recall_at_k(raw, test_pairs)}),
      "after": {"grounded_text": {"validation": grounding.pair_recall_at_k(best, val_pairs),
                                  "test": grounding.pair_recall_at_k(best, test_pairs)}},
      "reference": {"collab_id_embedding": {
          "validation": grounding.pair_recall_at_k(vid, val_pairs),
          "test": grounding.pair_recall_at_k(vid, test_pairs)}},
      "best_step": meta["best_step"],
      "pretrained_backbone": pretrained,
      "views": {k: int(len(v)) for k, v in pools.items()},
  }
  utils.save_npy(os.path.join(out_dir, "raw_text_emb.npy"), raw)
  utils.save_npy(os.path.join(out_dir, "item_text_emb.npy"), best)
  utils.write_json(os.path.join(out_dir, "report.json"), report)
  ckpt.close()
  return {"best_step": meta["best_step"], "pretrained_backbone": pretrained,
          "pair_recall@10_test": {"untrained": meta["before"]["untrained_text_tower"]["test"],
                                  "tfidf": report["before"]["raw_tfidf_text"]["test"],
                                  "grounded": report["after"]["grounded_text"]["test"]}}
