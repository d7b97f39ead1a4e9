"""Stage ``ground``: trains the dual-tower alignment encoder; writes grounded item embeddings.

Artifacts in ``WORKDIR/ground``: ``item_text_emb.npy`` [N, E] (grounded, from the step with the
best validation pair recall), ``raw_text_emb.npy`` [N, E] (TF-IDF + PCA, un-grounded: the
`sigma_no_grounding` ablation), ``report.json`` (pair Recall@10 before and after grounding),
``metrics.jsonl``, ``ckpt/`` and ``tower/`` (the text tower's decoder at the best-validation step,
the step ``item_text_emb.npy`` comes from; ``sft.init='grounded'`` starts SFT from it).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax import checkpoint, distributed, parallel, utils, workdir as wd
from sigma_jax.data import loader, pairs, text
from sigma_jax.models import grounding
from sigma_jax.train import ground, loop, optim, pretrain


def run(cfg, workdir: str) -> dict:
  g = cfg.ground
  seed = int(cfg.seed)
  ds = loader.load_dataset(cfg, workdir)
  n = ds.num_items
  tok = text.TextTokenizer(text.model_path(workdir))
  v_id_host = np.asarray(grounding.l2_normalize(
      jnp.asarray(ground.load_item_id_embeddings(workdir, n))))
  ids, mask = ground.item_text_tokens(tok, ds.raw.items, int(cfg.text.max_item_tokens))
  pools = pairs.build_pools(ds, g, seed)
  held = {"validation": ground.heldout_pairs(ds.splits.valid_hist, ds.splits.valid_target),
          "test": ground.heldout_pairs(ds.splits.test_hist, ds.splits.test_target)}

  def recall(emb) -> dict:
    return {split: grounding.pair_recall_at_k(emb, p) for split, p in held.items()}

  mesh, rules = parallel.make_mesh(cfg.mesh), cfg.axis_rules
  model_cfg = ground._model_cfg(cfg, tok.spm_size)
  graphdef, params = parallel.init_sharded(
      lambda: grounding.TextTower(model_cfg, int(g.out_dim), rngs=nnx.Rngs(seed)), mesh, rules)
  # The text tower starts from the pretrain stage's decoder when there is one (pretrain.use).
  params["backbone"], pretrained = pretrain.load_into(params["backbone"], workdir, cfg,
                                                      tok.spm_size)
  tx, _ = optim.make_optimizer(g.learning_rate, g.warmup_steps, g.steps, g.weight_decay)
  state, state_sh = parallel.train_state(tx, params, mesh, rules)
  state_sh["best_emb"] = parallel.replicated(mesh)
  state["best_emb"] = parallel.put_replicated(np.zeros((n, int(g.out_dim)), np.float32), mesh)
  batch_sh = {k: parallel.batch_sharding(mesh, nd, rules)
              for k, nd in (("tokens", 2), ("mask", 2), ("items", 1))}
  step_fn = ground.make_train_step(graphdef, tx, parallel.put_replicated(v_id_host, mesh),
                                   float(g.tau), float(g.kd_weight), mesh, rules, state_sh,
                                   batch_sh)
  embed_all = ground.make_encoder(graphdef, ids, mask, int(g.encode_batch), mesh, rules)
  steps, batch_pairs = int(g.steps), int(g.batch_pairs)

  def train_step(st, step):
    pr = pairs.sample_pairs(pools, batch_pairs, seed, step)
    items = np.concatenate([pr[:, 0], pr[:, 1]]).astype(np.int32)
    items = items[distributed.host_rows(len(items))]  # this process's rows only
    batch = parallel.shard_batch({"tokens": ids[items], "mask": mask[items], "items": items},
                                 mesh, rules)
    st, m = step_fn(st, batch)
    return st, m, batch_pairs

  def log(st, meta, m, pairs_per_s):
    rec = dict(m, pairs_per_s=pairs_per_s)
    if meta["step"] % int(g.eval_every) == 0 or meta["step"] == steps:
      emb = embed_all(st["params"])
      rec["val_pair_recall@10"] = grounding.pair_recall_at_k(emb, held["validation"])
      if rec["val_pair_recall@10"] > meta["best_val"]:
        meta["best_val"], meta["best_step"] = rec["val_pair_recall@10"], meta["step"]
        st["best_emb"] = parallel.put_replicated(emb, mesh)
        # The decoder behind these embeddings. A resumed run that finds this best again saves
        # it again (same step, same weights); the stage reads back meta's best step.
        with checkpoint.Checkpointer(wd.path(workdir, wd.GROUND_TOWER), max_to_keep=1,
                                     async_save=False) as tower:
          tower.save(meta["step"], st["params"]["backbone"], {"step": meta["step"]})
    return st, rec

  def begin(st, meta):
    if meta["before"] is None:
      meta["before"] = {"untrained_text_tower": recall(embed_all(st["params"]))}
    return meta

  spec = loop.Loop("ground", workdir, steps, int(g.log_every), int(g.ckpt_every),
                   progress=bool(cfg.progress), postfix=("loss", "acc"))
  meta = {"step": 0, "best_step": None, "best_val": -1.0, "before": None}
  state, meta, _ = loop.train(spec, state, meta, train_step, log, begin=begin)

  best = np.asarray(state["best_emb"])
  raw = grounding.raw_text_embeddings(ids, mask & (ids != tok.special[text.END]), tok.spm_size,
                                      int(g.out_dim))
  report = {
      "metric": "pair recall@10: retrieve the held-out next item (validation / test target) "
                "from the newest history item among all items, by cosine",
      "num_pairs": {split: int(len(p)) for split, p in held.items()},
      "before": dict(meta["before"], raw_tfidf_text=recall(raw)),
      "after": {"grounded_text": recall(best)},
      "reference": {"collab_id_embedding": recall(v_id_host)},
      "best_step": meta["best_step"],
      "pretrained_backbone": pretrained,
      "views": {k: int(len(v)) for k, v in pools.items()},
  }
  utils.save_npy(wd.path(workdir, wd.GROUND_RAW_EMB), raw)
  utils.save_npy(wd.path(workdir, wd.GROUND_TEXT_EMB), best)
  utils.write_json(wd.path(workdir, "ground/report.json"), report)
  return {"best_step": meta["best_step"], "pretrained_backbone": pretrained,
          "pair_recall@10_test": {"untrained": meta["before"]["untrained_text_tower"]["test"],
                                  "tfidf": report["before"]["raw_tfidf_text"]["test"],
                                  "grounded": report["after"]["grounded_text"]["test"]}}
