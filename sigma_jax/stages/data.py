"""Stage ``data``: original files -> TFDS array_record dataset, splits and statistics."""
from __future__ import annotations

import logging

from sigma_jax import utils, workdir as wd
from sigma_jax.data import builders, loader


def run(cfg, workdir: str) -> dict:
  builders.build(cfg.dataset.name, loader.tfds_dir(cfg, workdir), cfg.dataset.manual_dir,
                 cfg.dataset.format)
  ds = loader.load_dataset(cfg, workdir)
  stats = ds.raw.stats()
  stats["splits"] = ds.splits.counts()
  stats["protocol"] = {"split": "leave-one-out (TIGER): last item test, second-last validation",
                       "max_history": int(cfg.dataset.max_history),
                       "exclude_history": bool(cfg.dataset.exclude_history)}
  if cfg.dataset.exclude_history and stats["repeat_share"] > 0:
    logging.warning("dataset.exclude_history is on but %.1f%% of interactions repeat an earlier "
                    "item of the same user: those targets can never be recommended",
                    100 * stats["repeat_share"])
  utils.write_json(wd.path(workdir, wd.DATA_STATS), stats)
  return {k: stats[k] for k in ("num_users", "num_items", "num_interactions")}
