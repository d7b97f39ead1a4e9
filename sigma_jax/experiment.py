"""Runs one dataset's comparison through the pipeline: the shared stages once, then each row's
own stages in ``WORKDIR/rows/<row>`` (linking the shared ones), its τ chosen on validation, and its
test evaluation. It sits above ``sigma_jax.pipeline`` (it runs pipelines); the rows, the τ
selection and the tables are ``sigma_jax.eval.compare``'s.
"""
from __future__ import annotations

import os

from sigma_jax import pipeline, utils, workdir as wd
from sigma_jax.eval import compare


def _train_row(cfg, workdir: str, row: str, configure: compare.Configure):
  """Links the shared stages into WORKDIR/rows/<row> (and the SFT of the row it reuses) and runs
  the row's own stages before eval. Returns (the row's directory, its config)."""
  own, reuse = compare.MODEL_ROWS[row]
  rdir = compare.row_dir(workdir, row)
  os.makedirs(rdir, exist_ok=True)
  for st in compare.SHARED + ("tfds",):
    if st not in own and os.path.exists(wd.stage_dir(workdir, st)):
      compare.link(wd.stage_dir(workdir, st), wd.stage_dir(rdir, st))
  if reuse:
    compare.link(wd.stage_dir(compare.row_dir(workdir, reuse), "sft"),
                 wd.stage_dir(rdir, "sft"))
  rcfg = compare.row_config(cfg, row, configure)
  if "sft" in own:
    rcfg.stages = ",".join(s for s in own if s != "eval")
    pipeline.run(rcfg, rdir, strict=True)
  return rdir, rcfg


def run_row(cfg, workdir: str, row: str, taus, configure: compare.Configure, tau_limit: int = 0,
            select_only: bool = False, fixed_taus=compare.FIXED_SIGMA_TAUS) -> dict:
  """Trains (or finds) one generative row, chooses its τ and evaluates it.

  A row with a fixed APF σ (``generation.apf_fixed_sigma``) sweeps ``fixed_taus`` instead of
  ``taus``: only σ/τ matters there, so the sweep chooses the constant σ/τ on validation.

  ``<row>@all_items`` (TIGER's protocol) trains or finds ``<row>``, links its trained stages
  into WORKDIR/rows/<row>@all_items, and chooses τ and evaluates there with history items
  ranked like any other item.

  Returns {"metrics": the row's eval/metrics.json (None with ``select_only``), "tau": its τ
  sweep (``compare.select_tau``; with a fixed σ also "apf_fixed_sigma" and the chosen
  "sigma_over_tau"), {"reuses_sft_of": row} for an un-fused row, or None}.
  """
  base, all_items = compare.split_row(row)
  reuse = compare.MODEL_ROWS[base][1]
  rdir, rcfg = _train_row(cfg, workdir, base, configure)
  if all_items:  # the base row's model, ranked under the other protocol in a directory of its own
    brdir, rdir = rdir, compare.row_dir(workdir, row)
    os.makedirs(rdir, exist_ok=True)
    for st in compare.SHARED + ("tfds", "sft"):
      if os.path.lexists(wd.stage_dir(brdir, st)):
        compare.link(wd.stage_dir(brdir, st), wd.stage_dir(rdir, st))
    rcfg = compare.row_config(cfg, row, configure)
    reuse = reuse or base
  sweep = None
  if rcfg.generation.mode == "sigma" and rcfg.generation.fuse:
    fixed = float(rcfg.generation.apf_fixed_sigma)
    sweep = compare.select_tau(rcfg, rdir, fixed_taus if fixed > 0 else taus, tau_limit)
    rcfg.generation.apf_tau = sweep["chosen_tau"]
    if fixed > 0:
      sweep = dict(sweep, apf_fixed_sigma=fixed, sigma_over_tau=fixed / sweep["chosen_tau"])
    if reuse:
      sweep = dict(sweep, reuses_sft_of=reuse)
  elif reuse:  # the un-fused ranking has no τ; record which model it ranks
    sweep = {"reuses_sft_of": reuse}
  if select_only:
    return {"metrics": None, "tau": sweep}
  rcfg.stages = "eval"
  pipeline.run(rcfg, rdir, strict=True)
  metrics = utils.read_json(wd.path(rdir, wd.EVAL_METRICS))
  return {"metrics": metrics, "tau": sweep}


def run(cfg, workdir: str, rows=compare.ROWS, taus=compare.DEFAULT_TAUS, *,
        configure: compare.Configure, tau_limit: int = 0, select_only: bool = False,
        command: str = "", fixed_taus=compare.FIXED_SIGMA_TAUS) -> dict:
  """Runs the comparison: the shared stages, then each requested row in ``compare.ROWS`` order.

  Args:
    cfg: the dataset's config (command-line overrides included).
    workdir: the comparison's work directory.
    rows: the rows to run: names of ``compare.ROWS``, each optionally with the suffix
      ``@all_items`` (TIGER's protocol); an unknown name is a ValueError before any work.
    taus: APF temperatures tried on validation.
    configure: ``(config, row) -> the row's config`` (applies the row's config variant).
    tau_limit: validation examples per task for choosing τ (0: all); test uses every example.
    select_only: train each row and run its τ sweep only; evaluate nothing on test.
    command: the command line, recorded in the result.
    fixed_taus: the τ grid of a row with a fixed σ (``run_row``).

  Returns:
    ``select_only``: {row: its τ sweep} (see ``compare.selection_markdown``). Otherwise the
    result written to <dataset>.json (see ``compare.result``).
  """
  rows = compare.ordered_rows(rows)
  shared = cfg.copy_and_resolve_references()
  # The popular row needs the data stage only; every other row needs all the shared stages.
  needed = (("data",) if {compare.split_row(r)[0] for r in rows} <= set(compare.POPULAR_ROWS)
            else compare.SHARED)
  shared.stages = ",".join(needed)
  pipeline.run(shared, workdir, strict=True)
  per_task = compare.is_per_task(cfg)
  out, timing = {}, {s: compare.stage_seconds(workdir, [s]) for s in needed}
  for row in rows:
    base, all_items = compare.split_row(row)
    pcfg = compare.protocol_config(cfg.copy_and_resolve_references(), all_items)
    if base in compare.POPULAR_ROWS:
      pcfg = compare.relaxed_tasks(compare.protocol_config(
          configure(cfg.copy_and_resolve_references(), base), all_items))
      if not select_only:  # nothing to select: its row is its validation and test metrics
        out[row] = compare.popular_row(pcfg, workdir, row)
        timing[row] = utils.read_json(wd.path(compare.row_dir(workdir, row),
                                              wd.EVAL_METRICS))["wall_time_s"]
      continue
    if base == "collab":
      if not select_only:  # its row is test metrics (and may re-score on test)
        out[row] = compare.collab_row(pcfg, workdir)
        compare.collab_ranks(pcfg, workdir, row)  # for its paired interval against sigma
      continue
    res = run_row(cfg, workdir, row, taus, configure, tau_limit, select_only, fixed_taus)
    if select_only:
      out[row] = res["tau"]
      continue
    out[row] = compare.model_row(res, per_task)
    own = ("eval",) if all_items else compare.MODEL_ROWS[base][0]
    timing[row] = round(compare.stage_seconds(compare.row_dir(workdir, row), own) +
                        float((res["tau"] or {}).get("wall_time_s", 0.0)), 1)
  if select_only:
    return out
  return compare.result(cfg, workdir, out, timing, command)
