"""Stage ``pretrain`` (optional): a causal LM over item texts and instruction phrasings.

The corpus, the loss and how later stages load the result are ``sigma_jax.train.pretrain``'s.
Writes ``WORKDIR/pretrain/``: ``ckpt/``, ``backbone/`` (the final decoder parameters),
``metrics.jsonl`` and ``report.json`` (held-out LM loss before and after).
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from sigma_jax import checkpoint, distributed, parallel, utils, workdir as wd
from sigma_jax.data import loader, text
from sigma_jax.models import backbone
from sigma_jax.train import loop, optim, pretrain


def run(cfg, workdir: str) -> dict:
  p = cfg.pretrain
  seed = int(cfg.seed)
  ds = loader.load_dataset(cfg, workdir)
  tok = text.TextTokenizer(text.model_path(workdir))
  train, held, is_item = pretrain.corpus(ds, tok, int(p.max_len), int(p.template_repeats),
                                         float(p.heldout_share), seed)
  mesh, rules = parallel.make_mesh(cfg.mesh), cfg.axis_rules
  mcfg = pretrain.model_config(cfg, tok.spm_size)
  graphdef, params = parallel.init_sharded(
      lambda: backbone.Decoder(mcfg, rngs=nnx.Rngs(seed)), mesh, rules)
  steps, bs = int(p.steps), int(p.batch_size)
  tx, _ = optim.make_optimizer(p.learning_rate, p.warmup_steps, steps, p.weight_decay)
  state, state_sh = parallel.train_state(tx, params, mesh, rules)
  step_fn = pretrain.make_train_step(graphdef, tx, mesh, rules, state_sh,
                                     parallel.batch_sharding(mesh, 2, rules))
  heldout_loss = pretrain.make_heldout_loss(graphdef, held, bs, mesh, rules, state_sh["params"])

  def train_step(st, step):
    rows = train[pretrain.batch_rows(len(train), bs, seed, step)[distributed.host_rows(bs)]]
    st, m = step_fn(st, parallel.shard_batch({"ids": rows}, mesh, rules)["ids"])
    return st, m, int((rows != text.PAD).sum()) * distributed.process_count()

  def log(st, meta, m, tokens_per_s):
    return st, {"loss": m["loss"], "grad_norm": m["grad_norm"], "tokens_per_s": tokens_per_s}

  def begin(st, meta):
    if meta["before"] is None:
      meta["before"] = heldout_loss(st["params"])
    return meta

  spec = loop.Loop("pretrain", workdir, steps, int(p.log_every), int(p.ckpt_every),
                   progress=bool(cfg.progress))
  state, meta, _ = loop.train(spec, state, {"step": 0, "before": None}, train_step, log,
                              begin=begin)

  after = heldout_loss(state["params"])
  with checkpoint.Checkpointer(pretrain.backbone_dir(workdir), max_to_keep=1,
                               async_save=False) as final:
    final.save(steps, state["params"], {"vocab_size": int(tok.spm_size), "steps": steps})
  report = {"heldout_items": int(len(held)), "train_rows": int(len(train)),
            "train_item_rows": int(is_item.sum()), "steps": steps, "batch_size": bs,
            "heldout_lm_loss": {"before": meta["before"], "after": after}}
  utils.write_json(wd.path(workdir, "pretrain/report.json"), report)
  return {"heldout_lm_loss": report["heldout_lm_loss"], "steps": steps}
