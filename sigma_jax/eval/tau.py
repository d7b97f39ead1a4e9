"""APF's τ swept on the validation split: the one sweep behind the comparison's choice of τ
(``sigma_jax.eval.compare``), the accuracy–diversity figure (``sigma_jax.plots``) and the
decoding diagnostics (``sigma_jax.eval.diagnostics``).

Each τ ranks ``limit`` validation examples of every task (the first ones, or a seeded random
sample with ``generation.eval_sample="random"``) with the trained generator and
keeps the task's metrics (those of ``sigma_jax.eval.evaluate``, plus category coverage@10 on
every task). Results are cached in ``WORKDIR/tau_sweep.json``, one entry per sweep setting:

  {"sweeps": [{"settings": {"split": "validation", "examples_per_task": "all" | M,
                            "tasks": "all" | [names], "mode", "fuse", "num_beams", "top_m",
                            "top_n", "exclude_history", "sft_step"
                            (+ "apf_fixed_sigma" when σ is fixed, "item_prior" when
                            not 0, "constraints" / "instruction" when soft / none,
                            + "sample_seed" for a random sample of M)},
               "metrics": {"<τ>": {task: metrics}},   # every τ evaluated so far
               "wall_time_s": seconds spent on this entry, over all runs}]}

A sweep with a setting already cached evaluates only the τ values the entry lacks; any
difference in the setting (another number of examples, other decoding settings, a newer SFT
checkpoint) is another entry, computed afresh.
"""
from __future__ import annotations

import os
import time

from sigma_jax import utils
from sigma_jax import workdir as wd

CACHE = "tau_sweep.json"  # relative to the work directory


def key(tau) -> str:
  """The cache's name of one τ: str(float), e.g. '0.003'."""
  return str(float(tau))


def sft_step(workdir: str) -> int | None:
  """The newest SFT checkpoint step (names the model a cached sweep was computed with)."""
  ckpt = wd.ckpt_dir(workdir, "sft")
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps) if steps else None


def settings(cfg, workdir: str, limit: int | None = None, tasks=None) -> dict:
  """What a sweep's numbers depend on besides τ (the key of its cache entry)."""
  g = cfg.generation
  out = {"split": "validation", "examples_per_task": "all" if limit is None else int(limit),
         "tasks": "all" if tasks is None else [str(t) for t in tasks],
         "mode": str(g.mode), "fuse": bool(g.fuse), "num_beams": int(g.num_beams),
         "top_m": int(g.top_m), "top_n": int(g.top_n),
         "exclude_history": bool(cfg.dataset.exclude_history), "sft_step": sft_step(workdir)}
  if float(g.apf_fixed_sigma) > 0:  # absent when adaptive: earlier caches keep their keys
    out["apf_fixed_sigma"] = float(g.apf_fixed_sigma)
  # Like apf_fixed_sigma: present only when not the default, so earlier caches keep their keys.
  if float(g.get("item_prior", 0.0)) != 0.0:
    out["item_prior"] = float(g.item_prior)
  if g.get("constraints", "hard") != "hard":
    out["constraints"] = str(g.constraints)
  if g.get("instruction", "given") != "given":
    out["instruction"] = str(g.instruction)
  if limit is not None and g.get("eval_sample", "first") == "random":  # absent for "first"
    out["sample_seed"] = int(g.eval_sample_seed)
  return out


def _evaluate(cfg, generator, taus, limit, tasks) -> dict:
  """{key(τ): {task: validation metrics}} for each τ, ranked by the loaded generator."""
  from sigma_jax.data import tasks as tasks_lib
  from sigma_jax.eval import evaluate as E
  from sigma_jax.eval import metrics as M

  ds, gen, _ = generator
  _, membership = tasks_lib.item_categories(ds)
  extras = {"membership": membership,
            "tail": tasks_lib.tail_items(ds.splits, cfg.tasks.longtail_head_share)}
  built = tasks_lib.build_tasks(ds, cfg.tasks, "validation", tasks=tasks)
  g = cfg.generation
  batch = int(g.eval_batch)
  out = {}
  for tau in taus:
    res = out.setdefault(key(tau), {})
    for name, ex in built.items():
      if not len(ex.target):
        continue
      ex = E.limit_examples(ex, limit, g)
      # Ranked as the row's own evaluation ranks (soft constraints, no instruction).
      ranked = E.rank_examples(gen, ex, batch, tau=float(tau), **E.decoding_flags(g))
      m = E.task_metrics(ranked, ex, ds, extras)
      if "category_coverage@10" not in m:  # the trade-off figure wants it on every task
        m["category_coverage@10"] = M.category_coverage(ranked[:, :10], membership,
                                                        membership.shape[1])
      res[name] = m
  return out


def sweep(cfg, workdir: str, taus, limit: int | None = None, tasks=None, generator=None,
          force: bool = False, cache: bool = True) -> dict:
  """Validation metrics of a trained model at each APF τ.

  Args:
    cfg: the config the model in ``workdir`` was trained with (its generation settings rank).
    workdir: a work directory with a finished SFT stage.
    taus: the τ values (numbers or strings).
    limit: validation examples per task (which ones: ``generation.eval_sample``); None: all.
    tasks: task names; None: every task the data allows.
    generator: a loaded ``(dataset, Generator, step)`` to reuse; loaded from ``workdir`` only
      when a τ has to be evaluated.
    force: evaluate every τ again, even those cached.
    cache: read and update ``WORKDIR/tau_sweep.json``.

  Returns:
    {"settings": ..., "taus": [float τ, as requested], "metrics": {key(τ): {task: metrics}}
    for the requested τ only, "evaluated": [float τ computed by this call], "wall_time_s": the
    entry's compute time over all runs}.
  """
  path = wd.path(workdir, CACHE)
  want = settings(cfg, workdir, limit, tasks)
  stored = utils.read_json(path) if cache and os.path.exists(path) else {}
  entries = [e for e in stored.get("sweeps", []) if isinstance(e, dict)]
  entry = next((e for e in entries if e.get("settings") == want), None)
  if entry is None:
    entry = {"settings": want, "metrics": {}, "wall_time_s": 0.0}
    entries.append(entry)
  known = entry["metrics"]
  missing = [float(t) for t in dict.fromkeys(key(t) for t in taus)
             if force or key(t) not in known]
  if missing:
    start = time.time()
    if generator is None:
      from sigma_jax.eval import evaluate as E
      generator = E.load_generator(cfg, workdir)
    known.update(_evaluate(cfg, generator, missing, limit, tasks))
    entry["metrics"] = {key(t): known[key(t)] for t in sorted(known, key=float)}
    entry["wall_time_s"] = float(entry.get("wall_time_s", 0.0)) + time.time() - start
    if cache:
      utils.write_json(path, {"sweeps": entries})
  return {"settings": want, "taus": [float(t) for t in taus],
          "metrics": {key(t): entry["metrics"][key(t)] for t in taus}, "evaluated": missing,
          "wall_time_s": float(entry.get("wall_time_s", 0.0))}


def mean_over_tasks(result: dict, metric: str = "ndcg@10") -> dict:
  """{key(τ): the mean of ``metric`` over the tasks} of a ``sweep`` result (tasks equally
  weighted)."""
  # Summed in task-name order, so a fresh sweep and its cached copy give the same float.
  return {t: sum(by_task[name][metric] for name in sorted(by_task)) / len(by_task)
          for t, by_task in result["metrics"].items()}
