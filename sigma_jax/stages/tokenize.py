"""Stage ``tokenize``: semantic IDs from the item embeddings ``tokenizer.source`` names."""
from __future__ import annotations

import numpy as np

from sigma_jax import utils, workdir as wd
from sigma_jax.models import rq
from sigma_jax.train import tokenize


def run(cfg, workdir: str) -> dict:
  t = cfg.tokenizer
  if t.source not in tokenize.SOURCES:
    raise ValueError(f"tokenizer.source must be one of {sorted(tokenize.SOURCES)}, got "
                     f"{t.source!r}")
  x = np.load(wd.require(workdir, tokenize.SOURCES[t.source], "ground"))
  tokenize.check_config(t, len(x))
  out = rq.tokenize_items(x, t, seed=int(cfg.seed))
  d = wd.stage_dir(workdir, "tokenize")
  report = dict(out["report"], source=t.source, num_items=int(len(x)))
  utils.save_npy(f"{d}/codes.npy", out["codes"])
  utils.save_npy(wd.path(workdir, wd.TOKENIZE_SIDS), out["sids"])
  utils.atomic_write(wd.path(workdir, wd.TOKENIZE_BUCKETS), lambda f: np.savez(
      f, prefix_ids=out["prefix_ids"], bucket_table=out["bucket_table"],
      bucket_sizes=out["bucket_sizes"], prefixes=out["prefixes"]), "wb")
  if out["train_info"]:
    utils.write_json(f"{d}/train_info.json", out["train_info"])
  utils.write_json(wd.path(workdir, wd.TOKENIZE_REPORT), report)
  return {k: report[k] for k in ("usage_per_level", "collision_rate_before",
                                 "collision_rate_after", "bucket_size_max", "bucket_size_mean")}
