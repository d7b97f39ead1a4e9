"""Stage ``sft``: multi-task instruction tuning of the backbone + ProjFuse + `<q>` head.

Trains on every task the dataset allows (or ``sft.tasks``), training split only, with the pieces
``sigma_jax.train.sft.setup`` builds. Writes ``WORKDIR/sft/``: ``ckpt/`` (params, optimizer,
step), ``metrics.jsonl`` (each loss part, gradient norm, tokens/s, learning rate) and
``tasks.json`` (examples per task and split; for Query, the items each query matches).
"""
from __future__ import annotations

import logging

from sigma_jax import distributed, parallel, utils, workdir as wd
from sigma_jax.data import loader, tasks
from sigma_jax.train import loop, sft


def run(cfg, workdir: str) -> dict:
  s = cfg.sft
  ds = loader.load_dataset(cfg, workdir)
  run_ = sft.setup(cfg, workdir, parallel.make_mesh(cfg.mesh), ds=ds)
  counts = tasks.task_counts(ds, cfg.tasks)
  utils.write_json(wd.path(workdir, wd.SFT_TASKS), counts)
  for split, q in counts.get("query", {}).items():
    logging.info("query/%s: %d examples, %d targets without a query (dropped); items matching a "
                 "query: median %s, min %s", split, q["examples"], q["dropped"],
                 q.get("matches_median"), q.get("matches_min"))

  def train_step(state, step):
    batch = run_.host_batch(step)  # this process's rows
    state, m = run_.step(state, batch)
    return state, m, int(batch["attn_mask"].sum()) * distributed.process_count()

  def log(state, meta, m, tokens_per_s):
    return state, dict(m, epoch=meta["step"] / run_.steps_per_epoch, tokens_per_s=tokens_per_s,
                       lr=float(run_.schedule(meta["step"])))

  spec = loop.Loop("sft", workdir, run_.total_steps, int(s.log_every), int(s.ckpt_every),
                   progress=bool(cfg.progress), postfix=("loss", "ntp", "id"))
  loop.train(spec, run_.state, {"step": 0, "mode": run_.assets.mode}, train_step, log)
  logs = utils.read_jsonl(wd.metrics_log(workdir, "sft"))
  return {"steps": run_.total_steps, "examples": run_.counts, "final": logs[-1] if logs else {},
          "mode": run_.assets.mode}
