"""Stage ``eval``: every task's metrics on validation and test, ranked by the on-device generator.

Writes ``WORKDIR/eval/metrics.json``:
  {"tasks": {TASK: {"validation": {...}, "test": {...}}}, "mode": ..., "protocol": {...}}
and ``WORKDIR/eval/ranks.npz`` (each example's 0-based rank of its target, -1 when not listed;
``launch.compare`` pairs rows with it). The metrics are ``sigma_jax.eval.evaluate``'s.
"""
from __future__ import annotations

import numpy as np

from sigma_jax import utils, workdir as wd
from sigma_jax.data import tasks as tasks_lib
from sigma_jax.eval import evaluate
from sigma_jax.train import sft


def run(cfg, workdir: str) -> dict:
  ds, gen, step = evaluate.load_generator(cfg, workdir)
  g = cfg.generation
  limit = int(g.eval_limit) or None
  ranks = {}
  results = evaluate.evaluate(cfg, ds, gen, task_names=sft.task_list(g.eval_tasks), limit=limit,
                              progress=bool(cfg.progress), ranks_out=ranks)
  _, unavailable = tasks_lib.available_tasks(ds)
  out = {"tasks": results, "mode": gen.mode, "fused": gen.spec.fuse, "sft_step": int(step),
         "unavailable": unavailable,
         "protocol": {"split": "leave-one-out; validation = second-last item, test = last",
                      "ranking": "full catalogue through the generator; constrained tasks "
                                 "decode against the tables of the allowed items",
                      "history_items": "never returned" if gen.exclude_history
                                       else "ranked like any other item",
                      "examples_per_task": evaluate.sample_description(limit, g),
                      "num_beams": int(g.num_beams), "top_m": int(g.top_m),
                      "top_n": int(g.top_n), "apf_tau": float(g.apf_tau),
                      "invalid_or_duplicate_items": "impossible by construction; measured as "
                                                    "invalid_share"}}
  if float(g.apf_fixed_sigma) > 0:  # σ fixed instead of adaptive (sigma_fixed_fusion)
    out["protocol"]["apf_fixed_sigma"] = float(g.apf_fixed_sigma)
  utils.atomic_write(wd.path(workdir, wd.EVAL_RANKS), lambda f: np.savez(f, **ranks), "wb")
  utils.write_json(wd.path(workdir, wd.EVAL_METRICS), out)
  return {t: {s: round(v.get("hr@10", 0.0), 4) for s, v in r.items()} for t, r in results.items()}
