r"""Runs one dataset's comparison and writes its results table (Markdown and JSON).

  python -m launch.compare --config=configs/beauty.py --workdir=runs/beauty
  python -m launch.compare --config=configs/movielens.py --workdir=runs/movielens

Rows: `collab` (SASRec), `gr_sid` (TIGER-style full SID), `gr_id`, `sigma`, and the ablations
`sigma_no_grounding` (SIDs from un-grounded TF-IDF text embeddings) and `sigma_no_apf` (sigma's
model ranked without APF). The shared stages (data, text_tokenizer, collab, ground, tokenize) run
once in WORKDIR; each row's own stages run in WORKDIR/rows/<row>, which links the shared ones.
APF's τ is chosen per row on the validation split (`--taus`); test is evaluated once, with the
chosen τ. Writes docs/results/<dataset>.json and .md (or --out). Resumable like launch.train:
finished stages and rows are skipped.
"""
import os
import platform
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from sigma_jax import pipeline, utils

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the comparison.")
_ROWS = flags.DEFINE_list("rows", ["collab", "gr_sid", "gr_id", "sigma", "sigma_no_grounding",
                                   "sigma_no_apf"], "Rows to run.")
_TAUS = flags.DEFINE_list("taus", ["0.003", "0.01", "0.03", "0.1"],
                          "APF temperatures tried on validation.")
_TAU_LIMIT = flags.DEFINE_integer("tau_limit", 0, "Validation examples per task used to choose "
                                  "τ (0: all); test always uses every example.")
_OUT = flags.DEFINE_string("out", "docs/results", "Directory for <dataset>.json and .md.")
_SELECT_ONLY = flags.DEFINE_bool(
    "select_only", False, "Validation only: train each row and run its τ sweep, print the "
    "validation table, and evaluate nothing on test (for choosing hyper-parameters).")
flags.mark_flags_as_required(["config", "workdir"])

SHARED = ("data", "text_tokenizer", "collab", "ground", "tokenize")
MODEL_ROWS = {  # row -> (config overrides, its own stages, the row whose sft it reuses)
    "sigma": ({}, ("sft", "eval"), None),
    # Full SIDs in the history: each item takes L + 2 tokens instead of the prefix's P + 2.
    "gr_sid": ({"generation.mode": "gr_sid", "sft.max_len": 192}, ("sft", "eval"), None),
    "gr_id": ({"generation.mode": "gr_id"}, ("sft", "eval"), None),
    "sigma_no_grounding": ({"tokenizer.source": "raw"}, ("tokenize", "sft", "eval"), None),
    "sigma_no_apf": ({"generation.fuse": False}, ("eval",), "sigma"),
}
TOP_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20", "hr@1")


def _set(cfg, dotted: str, value):
  node = cfg
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def _link(src: str, dst: str):
  if not os.path.lexists(dst):
    os.symlink(os.path.abspath(src), dst)


def _row_dir(workdir: str, row: str) -> str:
  return os.path.join(workdir, "rows", row)


def _select_tau(cfg, rdir: str, taus) -> dict:
  """Validation-only sweep of APF's τ; the chosen τ is the one with the best mean NDCG@10.

  The sweep is cached in ``tau_sweep.json``. A re-run with another grid evaluates only the τ
  values the cache lacks, and chooses among the requested grid alone; a cache made on a
  different number of validation examples is not reused.
  """
  path = os.path.join(rdir, "tau_sweep.json")
  limit = int(_TAU_LIMIT.value or cfg.generation.eval_limit) or None
  examples = "all" if limit is None else limit
  cached = utils.read_json(path) if os.path.exists(path) else {}
  if cached.get("validation_examples_per_task") != examples:
    cached = {}
  known = {float(t): v for t, v in cached.get("validation_mean_ndcg@10", {}).items()}
  missing = [float(t) for t in taus if float(t) not in known]
  start = time.time()
  if missing:
    from sigma_jax.eval import stage as eval_stage
    from sigma_jax.train import sft
    ds, gen, _ = eval_stage.load_generator(cfg, rdir)
    names = sft.task_list(cfg.generation.eval_tasks)
    for tau in missing:
      res = eval_stage.evaluate(cfg, ds, gen, splits=("validation",), task_names=names,
                                tau=tau, limit=limit, progress=False)
      known[tau] = sum(r["validation"]["ndcg@10"] for r in res.values()) / len(res)
  sweep = {str(float(t)): known[float(t)] for t in taus}
  best = max(sweep, key=sweep.get)
  out = {"validation_mean_ndcg@10": sweep, "chosen_tau": float(best),
         "validation_examples_per_task": examples,
         "wall_time_s": round(cached.get("wall_time_s", 0.0) + time.time() - start, 1)}
  if missing:
    # The file keeps every τ evaluated so far; the returned sweep only the requested grid.
    utils.write_json(path, {**out, "validation_mean_ndcg@10": {
        str(t): v for t, v in sorted(known.items())}})
  return out


def run_row(cfg, workdir: str, row: str, taus) -> dict:
  overrides, own, reuse = MODEL_ROWS[row]
  rdir = _row_dir(workdir, row)
  os.makedirs(rdir, exist_ok=True)
  for st in SHARED + ("tfds",):
    if st not in own and os.path.exists(os.path.join(workdir, st)):
      _link(os.path.join(workdir, st), os.path.join(rdir, st))
  if reuse:
    _link(os.path.join(_row_dir(workdir, reuse), "sft"), os.path.join(rdir, "sft"))
  rcfg = cfg.copy_and_resolve_references()
  for k, v in overrides.items():
    _set(rcfg, k, v)
  sweep = None
  if "sft" in own:
    rcfg.stages = ",".join(s for s in own if s != "eval")
    pipeline.run(rcfg, rdir, strict=True)
  if rcfg.generation.mode == "sigma" and rcfg.generation.fuse:
    sweep = _select_tau(rcfg, rdir, taus)
    rcfg.generation.apf_tau = sweep["chosen_tau"]
  elif reuse:  # the un-fused ranking has no τ; record which model it ranks
    sweep = {"reuses_sft_of": reuse}
  if _SELECT_ONLY.value:
    return {"metrics": None, "tau": sweep}
  rcfg.stages = "eval"
  pipeline.run(rcfg, rdir, strict=True)
  metrics = utils.read_json(os.path.join(rdir, "eval", "metrics.json"))
  return {"metrics": metrics, "tau": sweep}


def _stage_seconds(workdir: str, stages) -> float:
  """Compute time of finished stages, from their DONE.json (stable across resumed runs)."""
  total = 0.0
  for st in stages:
    path = os.path.join(workdir, st, "DONE.json")
    if os.path.exists(path):
      total += float(utils.read_json(path).get("wall_time_s", 0.0))
  return total


def _collab_row(cfg, workdir: str) -> dict:
  r = utils.read_json(os.path.join(workdir, "collab", "result.json"))
  if bool(r.get("exclude_history", False)) != bool(cfg.dataset.exclude_history):
    # Trained under the other ranking protocol: the same parameters, ranked as configured now.
    from sigma_jax.data import loader
    from sigma_jax.train import collab
    r = collab.rescore(cfg, loader.load_dataset(cfg, workdir).splits, workdir)
  row = {"validation": r["validation"], "test": r["test"], "best_epoch": r["best_epoch"]}
  if "epoch_selected_with_exclude_history" in r:
    row["epoch_selected_with_exclude_history"] = r["epoch_selected_with_exclude_history"]
  return row


def _model_row(res: dict, per_task: bool) -> dict:
  tasks = res["metrics"]["tasks"]
  if per_task:
    out = {split: {t: tasks[t][split] for t in tasks} for split in ("validation", "test")}
  else:  # Beauty / Scientific: the sequential task (TIGER's protocol) is JustForYou
    out = {split: tasks["justforyou"][split] for split in ("validation", "test")}
  out["apf"] = res["tau"]
  return out


def _paired(workdir: str, rows, reference: str = "sigma", k: int = 10) -> dict:
  """Paired bootstrap of test NDCG@k, reference row minus each other generative row, per task.

  Uses each row's WORKDIR/rows/<row>/eval/ranks.npz (per-example target ranks). Rows evaluated
  before ranks were saved are listed under "missing"; re-running their eval stage adds them.
  """
  import numpy as np
  from sigma_jax.eval import metrics as M

  def load(row):
    path = os.path.join(_row_dir(workdir, row), "eval", "ranks.npz")
    return dict(np.load(path)) if os.path.exists(path) else None

  out = {"reference": reference, "metric": f"ndcg@{k}", "split": "test", "resamples": 2000,
         "interval": "95% percentile bootstrap over examples, paired", "rows": {}, "missing": []}
  ref = load(reference) if reference in rows else None
  if ref is None:
    out["missing"].append(reference)
    return out
  for row in rows:
    if row in (reference, "collab"):
      continue
    other = load(row)
    if other is None:
      out["missing"].append(row)
      continue
    for key in sorted(ref):
      task, split = key.split("/")
      if split == "test" and key in other and len(ref[key]) == len(other[key]):
        out["rows"].setdefault(row, {})[task] = M.paired_bootstrap(
            M.ndcg_per_example(ref[key], k), M.ndcg_per_example(other[key], k))
  return out


def _paired_markdown(paired: dict) -> str:
  if not paired.get("rows"):
    return ""
  tasks = sorted({t for r in paired["rows"].values() for t in r})
  lines = [f"## {paired['reference']} minus each row: test {paired['metric'].upper()}, "
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
                  "eval/ranks.npz existed; delete the row's eval/ and re-run to add it)."]
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


def _markdown(name: str, rows: dict, per_task: bool) -> str:
  lines = [f"# {name}: test metrics (selected on validation)", ""]
  if not per_task:
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    lines += ["| row | " + " | ".join(k.upper().replace("RECALL", "R").replace("NDCG", "N")
                                      for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for row, r in rows.items():
      lines.append(f"| {row} | " + " | ".join(f"{r['test'][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
  keys = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@10")
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


def _selection_markdown(sweeps: dict) -> str:
  """The validation τ sweeps of ``--select_only``: one line per row and τ."""
  lines = ["| row | τ | validation mean NDCG@10 | examples per task |", "|---|---|---|---|"]
  for row, sw in sweeps.items():
    if not sw or "validation_mean_ndcg@10" not in sw:
      continue
    for tau, v in sw["validation_mean_ndcg@10"].items():
      star = " (chosen)" if float(tau) == sw["chosen_tau"] else ""
      lines.append(f"| {row} | {tau}{star} | {v:.4f} | {sw['validation_examples_per_task']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import logging as pylogging
  pylogging.getLogger().setLevel(pylogging.INFO)
  cfg = _CONFIG.value
  workdir = _WORKDIR.value
  name = cfg.dataset.name
  shared = cfg.copy_and_resolve_references()
  shared.stages = ",".join(SHARED)
  pipeline.run(shared, workdir, strict=True)
  per_task = bool(cfg.dataset.name in ("movielens", "demo"))
  rows, timing = {}, {s: _stage_seconds(workdir, [s]) for s in SHARED}
  order = [r for r in ("collab", "sigma", "gr_sid", "gr_id", "sigma_no_grounding",
                       "sigma_no_apf") if r in _ROWS.value]
  for row in order:
    if row == "collab":
      if not _SELECT_ONLY.value:  # its row is test metrics (and may re-score on test)
        rows[row] = _collab_row(cfg, workdir)
      continue
    res = run_row(cfg, workdir, row, _TAUS.value)
    if _SELECT_ONLY.value:
      rows[row] = res["tau"]
      continue
    rows[row] = _model_row(res, per_task)
    own = MODEL_ROWS[row][1]
    timing[row] = round(_stage_seconds(_row_dir(workdir, row), own) +
                        float((res["tau"] or {}).get("wall_time_s", 0.0)), 1)
  if _SELECT_ONLY.value:
    print(_selection_markdown(rows))
    return
  g = cfg.generation
  result = {
      "rows": rows,
      "protocol": {
          "split": "leave-one-out (TIGER): last item test, second-last validation, history "
                   f"truncated to the last {cfg.dataset.max_history} items",
          "ranking": "full catalogue; no sampled negatives; "
                     + ("items of the user's own history never recommended "
                        "(dataset.exclude_history; the share of interactions that repeat an "
                        "earlier item is data/stats.json's repeat_share)"
                        if cfg.dataset.exclude_history else "history items ranked like any other"),
          "task": "per task (all seven where the data allows)" if per_task else
                  "JustForYou (next item), one example per user",
          "num_beams": int(g.num_beams), "top_m": int(g.top_m), "top_n": int(g.top_n),
          "invalid_or_duplicate_items": "impossible by construction (trie-constrained decoding, "
                                        "one bucket per item); measured as invalid_share",
          "selection": "collab: epoch by validation NDCG@10; sigma rows: APF τ by validation "
                       "mean NDCG@10; test evaluated once",
          "sft": {"epochs": float(cfg.sft.epochs), "tasks": cfg.sft.tasks or "all available",
                  "id_negatives": str(cfg.sft.id_negatives),
                  "backbone": cfg.model.size},
      },
      "wall_time_s": round(sum(timing.values()), 1),
      "wall_time_s_by_part": timing,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
      "command": "python -m launch.compare " + " ".join(sys.argv[1:]),
  }
  result["paired_vs_sigma"] = _paired(workdir, rows)
  md = _markdown(name, rows, per_task) + "\n" + _paired_markdown(result["paired_vs_sigma"])
  os.makedirs(_OUT.value, exist_ok=True)
  utils.write_json(os.path.join(_OUT.value, f"{name}.json"), result)
  utils.write_bytes(os.path.join(_OUT.value, f"{name}.md"), md.encode())
  print(md)


if __name__ == "__main__":
  app.run(main)
