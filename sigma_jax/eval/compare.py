"""One dataset's comparison: the rows, τ selection, paired intervals and the tables (Markdown and
JSON) of ``launch/compare.py``. ``sigma_jax.experiment`` runs the rows through the pipeline.

Rows: ``popular`` (the most popular training items; no model; ``popular_soft`` ignores a task's
constraint), ``collab`` (SASRec), ``gr_sid``
(TIGER-style full SID), ``gr_id``, ``sigma``, and the ablations ``sigma_no_grounding`` (SIDs
from un-grounded TF-IDF text embeddings), ``sigma_no_apf`` (sigma's model ranked without APF)
and ``sigma_fixed_fusion`` (sigma's model, APF with a constant σ chosen on validation instead of
the adaptive one); ``sigma_soft`` (sigma's model, Category and Query constraints in the prompt
only, ``generation.constraints='soft'``) and ``sigma_no_instruction`` (the same, given no
instruction text). A row's config is the comparison's config with the row's variant applied
(``configure(cfg, row)``; ``launch.compare`` passes ``configs/base.py``'s ``apply_variant``,
where the rows' config changes are defined); this module holds what is not config: the stages
each row runs itself and whose SFT it reuses.

The shared stages (data, text_tokenizer, collab, ground, tokenize) run once in WORKDIR; each
row's own stages run in WORKDIR/rows/<row>, which links the shared ones. APF's τ is chosen per
row on the validation split (``sigma_jax.eval.tau``); test is evaluated once, with the chosen τ.
Finished stages and rows are skipped, so a comparison resumes where it stopped.

No flags here: everything comes in as arguments.
"""
from __future__ import annotations

import os
import platform
from typing import Callable

from sigma_jax import utils
from sigma_jax import workdir as wd

SHARED = ("data", "text_tokenizer", "collab", "ground", "tokenize")
ROWS = ("popular", "popular_soft", "collab", "sigma", "gr_sid", "gr_id", "sigma_no_grounding",
        "sigma_no_apf", "sigma_fixed_fusion", "sigma_soft", "sigma_no_instruction")  # order
POPULAR_ROWS = ("popular", "popular_soft")  # no model: popularity under the row's config
MODEL_ROWS = {  # row -> (its own stages, the row whose sft it reuses); config: its variant
    "sigma": (("sft", "eval"), None),
    "gr_sid": (("sft", "eval"), None),
    "gr_id": (("sft", "eval"), None),
    "sigma_no_grounding": (("tokenize", "sft", "eval"), None),
    "sigma_no_apf": (("eval",), "sigma"),
    "sigma_fixed_fusion": (("eval",), "sigma"),
    "sigma_soft": (("eval",), "sigma"),
    "sigma_no_instruction": (("eval",), "sigma"),
}
# A row named "<row>@all_items" is <row>'s model ranked under TIGER's protocol: every catalogue
# item ranked, the user's own history items included (dataset.exclude_history=false). It reuses
# <row>'s trained stages; its τ is chosen on validation under that protocol.
ALL_ITEMS = "@all_items"
DEFAULT_TAUS = ("0.003", "0.01", "0.03", "0.1")
# The τ grid of a row with a fixed σ (generation.apf_fixed_sigma = 1): its item logits are
# cos · σ / τ with one σ for every query, so choosing τ chooses the constant σ/τ. The grid spans
# σ/τ from 1 (nearly uniform within a bucket) to 333 (the best cosine takes the bucket); the
# adaptive rows' σ (a std of beam probabilities, at most 0.5) times their 1/τ falls inside it.
FIXED_SIGMA_TAUS = ("0.003", "0.01", "0.03", "0.1", "0.3", "1")

Configure = Callable  # (config, row name) -> the row's config


def link(src: str, dst: str):
  if not os.path.lexists(dst):
    os.symlink(os.path.abspath(src), dst)


def row_dir(workdir: str, row: str) -> str:
  return os.path.join(workdir, "rows", row)


def split_row(name: str) -> tuple[str, bool]:
  """'sigma@all_items' -> ('sigma', True); 'sigma' -> ('sigma', False).

  Raises ValueError naming the choices for an unknown row or protocol suffix.
  """
  row, at, protocol = name.partition("@")
  if row not in ROWS or (at and at + protocol != ALL_ITEMS):
    raise ValueError(f"unknown row {name!r}; choose from {', '.join(ROWS)}, each optionally "
                     f"with the suffix {ALL_ITEMS} (TIGER's protocol: history items ranked too)")
  return row, bool(at)


def ordered_rows(names) -> list:
  """The requested rows in table order: each row of ``ROWS``, then its ``@all_items`` twin."""
  wanted = set(names)
  for n in wanted:
    split_row(n)
  return [n for row in ROWS for n in (row, row + ALL_ITEMS) if n in wanted]


def protocol_config(cfg, all_items: bool):
  """``cfg`` (in place) under TIGER's protocol when ``all_items``: history items ranked too."""
  if all_items:
    cfg.dataset.exclude_history = False
  return cfg


def relaxed_tasks(cfg):
  """``cfg`` (in place) evaluating only the tasks whose constraint it relaxes, when it decodes
  with soft constraints (the rows sigma_soft, sigma_no_instruction, popular_soft).

  Soft decoding differs from hard decoding only on the hard-constraint tasks (Category, Query);
  on every other task such a row would repeat its hard twin's ranking. A config evaluating none
  of those tasks is left as it is.
  """
  from sigma_jax.data import tasks as tasks_lib
  from sigma_jax.train import sft
  if cfg.generation.constraints != "soft":
    return cfg
  names = sft.task_list(cfg.generation.eval_tasks) or list(tasks_lib.HARD_CONSTRAINT_TASKS)
  relaxed = [t for t in names if t in tasks_lib.HARD_CONSTRAINT_TASKS]
  if relaxed:
    cfg.generation.eval_tasks = ",".join(relaxed)
  return cfg


def row_config(cfg, row: str, configure: Configure):
  """The row's config: a resolved copy of ``cfg`` with the row's variant (and, for an
  ``@all_items`` row, TIGER's protocol) applied; a soft row evaluates the constrained tasks
  only (``relaxed_tasks``)."""
  base, all_items = split_row(row)
  if base not in MODEL_ROWS:
    raise ValueError(f"{row!r} is not a generative row; those are {', '.join(MODEL_ROWS)}")
  return relaxed_tasks(protocol_config(configure(cfg.copy_and_resolve_references(), base),
                                       all_items))


def select_tau(cfg, rdir: str, taus, tau_limit: int = 0) -> dict:
  """Validation-only sweep of APF's τ; the chosen τ is the one with the best mean NDCG@10.

  The sweep is ``tau.sweep``'s, cached in ``rdir/tau_sweep.json``: a re-run with another grid
  evaluates only the τ values the cache lacks and chooses among the requested grid alone; a
  cache made on a different number of validation examples is not reused.

  Args:
    cfg: the row's config.
    rdir: the row's work directory.
    taus: the τ grid.
    tau_limit: validation examples per task (0: ``generation.eval_limit``, where 0 is all).
  """
  from sigma_jax.eval import tau as tau_lib
  from sigma_jax.train import sft

  limit = int(tau_limit or cfg.generation.eval_limit) or None
  res = tau_lib.sweep(cfg, rdir, taus, limit=limit,
                      tasks=sft.task_list(cfg.generation.eval_tasks))
  means = tau_lib.mean_over_tasks(res, "ndcg@10")
  best = max(means, key=means.get)
  return {"validation_mean_ndcg@10": means, "chosen_tau": float(best),
          "validation_examples_per_task": res["settings"]["examples_per_task"],
          "wall_time_s": round(res["wall_time_s"], 1)}


def stage_seconds(workdir: str, stages) -> float:
  """Compute time of finished stages, from their DONE.json (stable across resumed runs)."""
  total = 0.0
  for st in stages:
    path = wd.done_marker(workdir, st)
    if os.path.exists(path):
      total += float(utils.read_json(path).get("wall_time_s", 0.0))
  return total


def collab_ranks(cfg, workdir: str, row: str = "collab") -> dict:
  """SASRec's per-example target ranks on JustForYou, for the paired bootstrap against sigma.

  Ranks the JustForYou validation and test examples the generative rows rank (the same
  examples, in the same order, ``generation.eval_limit`` and ``eval_sample`` applied alike)
  with the collab stage's selected parameters, as ``cfg`` ranks (history excluded or not), and
  writes them to WORKDIR/rows/<row>/eval/ranks.npz in the generative rows' layout.

  Returns:
    {"justforyou/<split>": [M] 0-based rank of the target in the top 20, -1 when absent}.
  """
  import numpy as np
  from sigma_jax.data import loader, tasks as tasks_lib
  from sigma_jax.eval import evaluate, metrics as M
  from sigma_jax.train import collab

  ds = loader.load_dataset(cfg, workdir)
  graphdef, params, _ = collab.load_best(cfg, ds.num_items, workdir)
  topk = collab.make_topk_fn(graphdef, max(collab.KS), collab.exclude_history(cfg))
  limit = int(cfg.generation.eval_limit) or None
  ranks = {}
  for split in ("validation", "test"):
    ex = tasks_lib.build_tasks(ds, cfg.tasks, split, tasks=["justforyou"])["justforyou"]
    ex = evaluate.limit_examples(ex, limit, cfg.generation)
    ranked = collab.ranked_lists(topk, params, ex.history, int(cfg.collab.max_len))
    ranks[f"justforyou/{split}"] = M.target_rank(ranked, ex.target)
  path = wd.path(row_dir(workdir, row), wd.EVAL_RANKS)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  utils.atomic_write(path, lambda f: np.savez(f, **ranks), "wb")
  return ranks


def collab_row(cfg, workdir: str) -> dict:
  """SASRec's row: its collab stage's validation and test metrics, ranked as ``cfg`` ranks."""
  r = utils.read_json(wd.path(workdir, wd.COLLAB_RESULT))
  if bool(r.get("exclude_history", False)) != bool(cfg.dataset.exclude_history):
    # Trained under the other ranking protocol: the same parameters, ranked as configured now.
    from sigma_jax.data import loader
    from sigma_jax.train import collab
    r = collab.rescore(cfg, loader.load_dataset(cfg, workdir).splits, workdir)
  row = {"validation": r["validation"], "test": r["test"], "best_epoch": r["best_epoch"]}
  if "epoch_selected_with_exclude_history" in r:
    row["epoch_selected_with_exclude_history"] = r["epoch_selected_with_exclude_history"]
  return row


def popular_row(cfg, workdir: str, row: str = "popular") -> dict:
  """The ``popular`` row (``sigma_jax.eval.popular``): needs the data stage only.

  Ranks every task's validation and test examples (``generation.eval_tasks``, at most
  ``generation.eval_limit`` per task, as the eval stage does) through ``evaluate.evaluate`` and
  writes WORKDIR/rows/popular/eval/metrics.json and ranks.npz (for the paired bootstrap).

  Returns:
    the row in ``model_row``'s layout: per task for MovieLens and the demo, else JustForYou's.
  """
  import time

  import numpy as np
  from sigma_jax.data import loader
  from sigma_jax.eval import evaluate, popular
  from sigma_jax.train import sft

  start = time.time()
  ds = loader.load_dataset(cfg, workdir)
  ranker = popular.PopularRanker(cfg, ds)
  g = cfg.generation
  ranks = {}
  results = evaluate.evaluate(cfg, ds, ranker, task_names=sft.task_list(g.eval_tasks),
                              limit=int(g.eval_limit) or None, progress=bool(cfg.progress),
                              ranks_out=ranks)
  rdir = row_dir(workdir, row)
  os.makedirs(wd.stage_dir(rdir, "eval"), exist_ok=True)
  metrics = {"tasks": results, "mode": "popular",
             "protocol": {"ranking": "training-split popularity (ties: lower item index); "
                                     + ("hard constraints applied as the generator applies them"
                                        if cfg.generation.constraints == "hard" else
                                        "constraints ignored (soft: popularity alone)"),
                          "history_items": "never returned" if ranker.exclude_history
                                           else "ranked like any other item"},
             "wall_time_s": round(time.time() - start, 1)}
  utils.atomic_write(wd.path(rdir, wd.EVAL_RANKS), lambda f: np.savez(f, **ranks), "wb")
  utils.write_json(wd.path(rdir, wd.EVAL_METRICS), metrics)
  row = model_row({"metrics": metrics, "tau": None}, is_per_task(cfg))
  del row["apf"]
  return row


def model_row(res: dict, per_task: bool) -> dict:
  """A generative row of the results table from ``run_row``'s result."""
  tasks = res["metrics"]["tasks"]
  if per_task:
    out = {split: {t: tasks[t][split] for t in tasks} for split in ("validation", "test")}
  else:  # Beauty / Scientific: the sequential task (TIGER's protocol) is JustForYou
    out = {split: tasks["justforyou"][split] for split in ("validation", "test")}
  out["apf"] = res["tau"]
  return out


def is_per_task(cfg) -> bool:
  """Whether the tables report every task: format movielens (MovieLens, the demo), or any
  dataset evaluated on more than JustForYou (``generation.eval_tasks``, e.g. the Amazon
  ``:multitask`` variant). Otherwise (an Amazon next-item comparison) JustForYou alone."""
  from sigma_jax.data import raw
  from sigma_jax.train import sft
  if raw.resolve_format(cfg.dataset.name, cfg.dataset.format) == "movielens":
    return True
  return sft.task_list(cfg.generation.eval_tasks) != ["justforyou"]


def result(cfg, workdir: str, rows: dict, timing: dict, command: str) -> dict:
  """The comparison's JSON: its rows, protocol, wall times, machine, command and the paired
  bootstrap against sigma."""
  per_task = is_per_task(cfg)
  g = cfg.generation
  out = {
      "rows": rows,
      "protocol": {
          "split": "leave-one-out (TIGER): last item test, second-last validation, history "
                   f"truncated to the last {cfg.dataset.max_history} items",
          "ranking": "full catalogue; no sampled negatives; "
                     + ("items of the user's own history never recommended "
                        "(dataset.exclude_history; the share of interactions that repeat an "
                        "earlier item is data/stats.json's repeat_share)"
                        if cfg.dataset.exclude_history else "history items ranked like any other"),
          "task": (f"per task: {cfg.generation.eval_tasks or 'every task the data allows'}"
                   if per_task else "JustForYou (next item), one example per user"),
          "num_beams": int(g.num_beams), "top_m": int(g.top_m), "top_n": int(g.top_n),
          "invalid_or_duplicate_items": "impossible by construction (trie-constrained decoding, "
                                        "one bucket per item); measured as invalid_share",
          "selection": "collab: epoch by validation NDCG@10; sigma rows: APF τ by validation "
                       "mean NDCG@10; test evaluated once",
          "rows_named_row@all_items": "TIGER's protocol: the row's model with every item "
                                      "ranked, history items included; τ chosen on validation "
                                      "under it; collab@all_items re-ranks with the parameters of "
                                      "the epoch collab selected under its own run's protocol",
          # sft.steps > 0 fixes the run's length; sft.epochs is then unused.
          "sft": {"epochs": float(cfg.sft.epochs), "steps": int(cfg.sft.steps),
                  "layout": str(cfg.sft.layout), "tasks": cfg.sft.tasks or "all available",
                  "id_negatives": str(cfg.sft.id_negatives),
                  "backbone": cfg.model.size},
      },
      "wall_time_s": round(sum(timing.values()), 1),
      "wall_time_s_by_part": timing,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
      "command": command,
  }
  out["paired_vs_sigma"] = paired(workdir, rows)
  return out


def report(cfg, result_: dict) -> str:
  """The Markdown of a ``run`` result: the metric tables, then the paired bootstrap."""
  return (markdown(cfg.dataset.name, result_["rows"], is_per_task(cfg)) + "\n" +
          paired_markdown(result_["paired_vs_sigma"]))


def output_paths(cfg, out_dir: str) -> tuple[str, str]:
  """OUT_DIR/<dataset>.json and OUT_DIR/<dataset>.md."""
  return tuple(os.path.join(out_dir, f"{cfg.dataset.name}.{ext}") for ext in ("json", "md"))


def check_overwrite(cfg, out_dir: str, overwrite: bool) -> None:
  """Raises FileExistsError if a table ``write`` would replace exists and ``overwrite`` is off."""
  if overwrite:
    return
  existing = [p for p in output_paths(cfg, out_dir) if os.path.exists(p)]
  if existing:
    raise FileExistsError(f"{existing[0]} already exists and would be overwritten; pass "
                          "--overwrite to replace it, or --out=DIR to write the tables to DIR "
                          "(--out=docs/results replaces the committed ones)")


def write(cfg, result_: dict, out_dir: str, overwrite: bool = True) -> str:
  """Writes OUT_DIR/<dataset>.json and .md; returns the Markdown. With ``overwrite`` off an
  existing table is an error (``check_overwrite``)."""
  check_overwrite(cfg, out_dir, overwrite)
  md = report(cfg, result_)
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = output_paths(cfg, out_dir)
  utils.write_json(json_path, result_)
  utils.write_bytes(md_path, md.encode())
  return md


def paired(workdir: str, rows, reference: str = "sigma", k: int = 10) -> dict:
  """Paired bootstrap of test NDCG@k, reference row minus each other row, per task.

  Uses each row's WORKDIR/rows/<row>/eval/ranks.npz (per-example target ranks; collab's are
  written by ``collab_ranks``, JustForYou only). Rows without them (evaluated before ranks were
  saved) are listed under "missing"; re-running the comparison with the row adds them (for a
  generative row, after deleting its eval/). An ``@all_items`` row is compared with
  ``<reference>@all_items`` (the same protocol).
  """
  import numpy as np

  def load(row):
    path = wd.path(row_dir(workdir, row), wd.EVAL_RANKS)
    return dict(np.load(path)) if os.path.exists(path) else None

  out = {"reference": reference, "metric": f"ndcg@{k}", "split": "test", "resamples": 2000,
         "interval": "95% percentile bootstrap over examples, paired", "rows": {}, "missing": []}
  refs = {}
  for suffix in ("", ALL_ITEMS):
    if any(r.endswith(ALL_ITEMS) == bool(suffix) for r in rows):
      name = reference + suffix
      refs[suffix] = load(name) if name in rows else None
      if refs[suffix] is None:
        out["missing"].append(name)
  for row in rows:
    suffix = ALL_ITEMS if row.endswith(ALL_ITEMS) else ""
    ref = refs.get(suffix)
    if row == reference + suffix or ref is None:
      continue
    other = load(row)
    if other is None:
      out["missing"].append(row)
      continue
    per_task = paired_ranks(ref, other, k)
    if per_task:
      out["rows"][row] = per_task
  return out


def paired_ranks(ref: dict, other: dict, k: int = 10, split: str = "test") -> dict:
  """{task: paired bootstrap of NDCG@k, ref minus other} for every ``<task>/<split>`` both
  ``ranks.npz`` dicts hold over the same number of examples."""
  from sigma_jax.eval import metrics as M

  out = {}
  for key in sorted(ref):
    task, s = key.split("/")
    if s == split and key in other and len(ref[key]) == len(other[key]):
      out[task] = M.paired_bootstrap(M.ndcg_per_example(ref[key], k),
                                     M.ndcg_per_example(other[key], k))
  return out


def paired_runs(reference_dir: str, other_dir: str, k: int = 10, split: str = "test") -> dict:
  """Paired bootstrap between two evaluated row directories of different runs (e.g. the
  multi-task sigma against the single-task one), ``paired``'s block for one row.

  Both directories must rank the same examples: their data stages must have been run under the
  same recipe (``data/recipe.json``), and a task is compared only where both hold its ranks over
  the same number of examples (``generation.eval_limit`` and ``eval_sample`` alike).

  Raises:
    FileNotFoundError naming a directory without eval/ranks.npz; ValueError when the data
      recipes differ (naming the keys) or when the two share no task of ``split``.
  """
  import numpy as np

  loaded = []
  for d in (reference_dir, other_dir):
    path = wd.path(d, wd.EVAL_RANKS)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: {d} has not been evaluated (run its eval "
                              "stage, or launch.compare with its row)")
    loaded.append(dict(np.load(path)))
  recipes = [utils.read_json(wd.recipe_path(d, "data")) if os.path.exists(
      wd.recipe_path(d, "data")) else None for d in (reference_dir, other_dir)]
  if None in recipes:
    missing = (reference_dir, other_dir)[recipes.index(None)]
    raise ValueError(f"{wd.recipe_path(missing, 'data')} not found: cannot tell whether the two "
                     "runs rank the same examples")
  diff = sorted(key for key in set(recipes[0]) | set(recipes[1])
                if recipes[0].get(key) != recipes[1].get(key))
  if diff:
    raise ValueError(f"{reference_dir} and {other_dir} were built from different data "
                     f"(data recipe keys differ: {', '.join(diff)}); their examples do not pair")
  per_task = paired_ranks(*loaded, k=k, split=split)
  if not per_task:
    raise ValueError(f"{reference_dir} and {other_dir} share no task with {split} ranks over the "
                     "same number of examples")
  return {"reference": reference_dir, "other": other_dir, "metric": f"ndcg@{k}", "split": split,
          "resamples": 2000, "interval": "95% percentile bootstrap over examples, paired",
          "tasks": per_task}


def paired_runs_markdown(result: dict) -> str:
  """The Markdown of a ``paired_runs`` result: one line per task."""
  lines = [f"{result['reference']} minus {result['other']}: {result['split']} "
           f"{result['metric'].upper()}, {result['interval']} ({result['resamples']} resamples; "
           "* the interval excludes 0)", "", "| task | difference [95% interval] | examples |",
           "|---|---|---|"]
  for task, c in result["tasks"].items():
    star = "*" if c["ci95_low"] > 0 or c["ci95_high"] < 0 else ""
    lines.append(f"| {task} | {c['diff']:+.4f}{star} [{c['ci95_low']:+.4f}, "
                 f"{c['ci95_high']:+.4f}] | {c['num_examples']} |")
  return "\n".join(lines) + "\n"


def paired_markdown(paired: dict) -> str:
  if not paired.get("rows"):
    return ""
  tasks = sorted({t for r in paired["rows"].values() for t in r})
  ref = paired["reference"]
  if any(r.endswith(ALL_ITEMS) for r in paired["rows"]):
    ref = f"{ref} (for an {ALL_ITEMS} row: {ref}{ALL_ITEMS})"
  lines = [f"## {ref} minus each row: test {paired['metric'].upper()}, "
           f"{paired['interval']} ({paired['resamples']} resamples; * the interval excludes 0)",
           "", "| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for row, r in paired["rows"].items():
    cells = []
    for t in tasks:
      c = r.get(t)
      if c is None:
        cells.append("—")
        continue
      star = "*" if c["ci95_low"] > 0 or c["ci95_high"] < 0 else ""
      cells.append(f"{c['diff']:+.4f}{star} [{c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}]")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  if paired["missing"]:
    lines += ["", f"No per-example ranks for: {', '.join(paired['missing'])} (evaluated before "
                  "eval/ranks.npz existed; re-run the comparison with the row, after deleting a "
                  "generative row's eval/, to add it)."]
  return "\n".join(lines) + "\n"


def _task_metrics(r: dict, split: str, task: str):
  """One row's metrics for one task, or None. SASRec (`collab`) is a next-item model: its flat
  metrics are its JustForYou metrics."""
  m = r.get(split)
  if not isinstance(m, dict):
    return None
  if isinstance(m.get(task), dict):
    return m[task]
  if task == "justforyou" and "hr@10" in m:
    return m
  return None


def markdown(name: str, rows: dict, per_task: bool) -> str:
  lines = [f"# {name}: test metrics (selected on validation)", ""]
  if not per_task:
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    lines += ["| row | " + " | ".join(k.upper().replace("RECALL", "R").replace("NDCG", "N")
                                      for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for row, r in rows.items():
      lines.append(f"| {row} | " + " | ".join(f"{r['test'][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
  keys = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")  # NDCG@1 = HR@1
  extra = ("constraint_satisfaction@10", "category_coverage@10", "intra_list_diversity@10",
           "long_tail_share@10")
  tasks = sorted({t for r in rows.values() if isinstance(r.get("test"), dict)
                  for t in r["test"] if isinstance(r["test"][t], dict)})
  # Summary: the mean over tasks of each row that has every task (SASRec has only JustForYou).
  full = {row: r for row, r in rows.items()
          if tasks and all(_task_metrics(r, "test", t) for t in tasks)}
  if full:
    lines += [f"Mean over the {len(tasks)} tasks (each task weighted equally):", "",
              "| row | mean HR@10 | mean NDCG@10 | validation mean NDCG@10 |", "|---|---|---|---|"]
    for row, r in full.items():
      mean = lambda split, k: sum(_task_metrics(r, split, t)[k] for t in tasks) / len(tasks)
      lines.append(f"| {row} | {mean('test', 'hr@10'):.4f} | {mean('test', 'ndcg@10'):.4f} | "
                   f"{mean('validation', 'ndcg@10'):.4f} |")
    lines.append("")
  for task in tasks:
    present = [k for k in extra if any(k in (_task_metrics(r, "test", task) or {})
                                       for r in rows.values())]
    cols = keys + tuple(present)
    n = next((m["num_examples"] for r in rows.values()
              for m in [_task_metrics(r, "test", task)] if m and "num_examples" in m), None)
    lines += [f"## {task}" + (f" ({n} test examples)" if n else ""), "",
              "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, r in rows.items():
      m = _task_metrics(r, "test", task)
      if m:
        lines.append(f"| {row} | " + " | ".join(
            f"{m[k]:.4f}" if k in m else "—" for k in cols) + " |")
    lines.append("")
  return "\n".join(lines) + "\n"


def selection_markdown(sweeps: dict) -> str:
  """The validation τ sweeps of a ``select_only`` run: one line per row and τ."""
  lines = ["| row | τ | validation mean NDCG@10 | examples per task |", "|---|---|---|---|"]
  for row, sw in sweeps.items():
    if not sw or "validation_mean_ndcg@10" not in sw:
      continue
    for tau, v in sw["validation_mean_ndcg@10"].items():
      star = " (chosen)" if float(tau) == sw["chosen_tau"] else ""
      lines.append(f"| {row} | {tau}{star} | {v:.4f} | {sw['validation_examples_per_task']} |")
  return "\n".join(lines) + "\n"
