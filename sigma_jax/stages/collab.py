"""Stage ``collab``: SASRec over the training split; writes the frozen `v_ID` table.

Outputs under ``WORKDIR/collab/`` (see ``sigma_jax.train.collab``): ``ckpt/`` (one checkpoint
per epoch), ``metrics.jsonl``, ``item_emb.npy`` (the best-validation epoch's item table) and
``result.json`` (selected epoch, validation and test metrics).
"""
from __future__ import annotations

from sigma_jax.data import loader
from sigma_jax.train import collab


def run(cfg, workdir: str) -> dict:
  ds = loader.load_dataset(cfg, workdir)
  result = collab.train_collab(cfg, ds.splits, workdir, progress=bool(cfg.progress))
  return {"best_epoch": result["best_epoch"],
          "validation": {k: result["validation"][k] for k in ("recall@10", "ndcg@10")},
          "test": {k: result["test"][k] for k in ("recall@10", "ndcg@10")}}
