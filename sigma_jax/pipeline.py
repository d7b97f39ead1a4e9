"""The staged run: each stage reads earlier stages' artifacts in the work directory and writes
its own. A finished stage leaves ``WORKDIR/<stage>/DONE.json`` (written last, atomically) and is
skipped on the next run; an unfinished one resumes from its own checkpoints.

``STAGES`` is the one list of stages, in the order they run; each is a module of
``sigma_jax.stages`` with ``run(cfg, workdir) -> summary``.
"""
from __future__ import annotations

import json
import logging
import os
import time

from sigma_jax import config_checks, distributed, utils, workdir as wd
from sigma_jax.stages import (collab, data, eval as eval_stage, ground, pretrain, sft,
                              text_tokenizer, tokenize)

# Every stage, in run order, whatever order config.stages lists them in.
STAGES = {
    "data": data.run,
    "text_tokenizer": text_tokenizer.run,
    "collab": collab.run,
    "pretrain": pretrain.run,
    "ground": ground.run,
    "tokenize": tokenize.run,
    "sft": sft.run,
    "eval": eval_stage.run,
}
# Run only when config.stages names them; config.stages="default" runs every other stage.
OPTIONAL = frozenset({"pretrain"})
DEFAULT_STAGES = tuple(s for s in STAGES if s not in OPTIONAL)
# Stages that run on one host's devices: in a multi-process run process 0 runs them alone.
HOST_LOCAL = frozenset({"data", "text_tokenizer", "collab", "tokenize"})


def parse_stages(spec) -> list[str]:
  """'data,collab' (or a list, or 'default') -> stage names in run order; unknown names are an
  error."""
  if spec == "default":
    return list(DEFAULT_STAGES)
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  if not names:
    raise ValueError("config.stages is empty; name at least one stage, e.g. --config.stages=data")
  unknown = [n for n in names if n not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)} "
                     "(or 'default')")
  return [s for s in STAGES if s in names]


def validate(cfg, workdir: str | None = None, devices=None) -> None:
  """``config_checks.validate`` for the stages ``cfg.stages`` names: contradictions in the config
  are ValueErrors naming the fields, raised before any work."""
  config_checks.validate(cfg, parse_stages(cfg.stages), workdir, devices)


# The config a stage's artifacts depend on: its own sections and those of every stage before it
# (a stage reads its predecessors' artifacts). Keys in _INCIDENTAL do not count.
_READS = {
    "data": ("seed", "dataset"),
    "text_tokenizer": ("text",),
    "collab": ("collab",),
    "pretrain": ("pretrain", "model"),
    "ground": ("ground", "model"),
    "tokenize": ("tokenizer",),
    "sft": ("sft", "tasks", "generation.mode"),
    "eval": ("generation", "dataset.exclude_history"),
}
# Read only when ranking (the collab row is re-scored under a changed protocol), so not part of
# the data stage's recipe.
_RANKING = frozenset({"dataset.exclude_history"})
# Logging and checkpoint cadence, inference batch and prompt sizes, sequence packing and data
# locations:
# they change how a stage runs, not what it computes.
_INCIDENTAL = frozenset({"log_every", "ckpt_every", "eval_batch", "encode_batch", "pack",
                         "prompt_bucket", "tfds_dir", "manual_dir"})


# Config keys added after runs recorded their recipes, with the value that reproduces what those
# runs did: a recipe without the key equals one with this value.
_ADDED_DEFAULTS = {"sft.similarity": "cosine", "collab.select_metric": "ndcg@10",
                   "dataset.format": "", "sft.init": "auto",
                   "generation.apf_fixed_sigma": 0.0, "generation.item_prior": 0.0,
                   "sft.text_features": "grounded",
                   "generation.constraints": "hard", "generation.instruction": "given",
                   "generation.eval_sample": "first", "generation.eval_sample_seed": 0}


def recipe(cfg, name: str, workdir: str) -> dict:
  """{dotted key: value} of the config that stage ``name``'s artifacts in ``workdir`` depend on
  (the optional pretrain stage's only when it has run there)."""
  flat = {}

  def walk(prefix, node, top):
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}.{k}", v, top)
    elif prefix.rsplit(".", 1)[-1] not in _INCIDENTAL and (prefix == top or prefix not in _RANKING):
      flat[prefix] = node

  for stage_name in list(STAGES)[:list(STAGES).index(name) + 1]:
    if stage_name == "pretrain" and name != "pretrain" and not wd.is_done(workdir, "pretrain"):
      continue
    for key in _READS[stage_name]:
      node = cfg
      for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
      if node is not None:
        walk(key, node, key)
  return json.loads(json.dumps(flat, sort_keys=True, default=str))  # tuples -> lists


def recipe_changes(cfg, workdir: str, name: str) -> list[str]:
  """'key: recorded -> now' for each config value a finished stage was run under and that the
  current config changes; empty when they agree or the stage recorded no recipe."""
  path = wd.recipe_path(workdir, name)
  if not os.path.exists(path):
    return []
  before, now = utils.read_json(path), recipe(cfg, name, workdir)
  if "sft.every_position" in before:  # renamed: True -> 'sequence', False -> 'per_position'
    before["sft.layout"] = "sequence" if before.pop("sft.every_position") else "per_position"
  for k, v in _ADDED_DEFAULTS.items():
    if k in now:
      before.setdefault(k, v)
  return [f"{k}: {before.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}"
          for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def run(cfg, workdir: str, strict: bool = False) -> dict:
  """Runs the stages of ``cfg.stages`` in order; returns each stage's summary.

  A finished stage is skipped. When the config it was run under (``recipe``) differs from
  ``cfg``, that is logged as a warning, or raised as a ValueError when ``strict``.
  """
  stages = parse_stages(cfg.stages)
  config_checks.validate(cfg, stages, workdir)  # contradictions are errors before any work
  os.makedirs(workdir, exist_ok=True)
  summaries = {}
  multi = distributed.process_count() > 1
  for name in stages:
    if wd.is_done(workdir, name):
      changes = recipe_changes(cfg, workdir, name)
      if changes:
        msg = (f"stage {name}: {os.path.join(workdir, name)} was finished under another config "
               f"({'; '.join(changes)}); its artifacts are what later stages read. Use a new "
               f"work directory, or delete that stage directory to re-run it.")
        if strict:
          raise ValueError(msg)
        logging.warning("%s Reusing it.", msg)
      logging.info("stage %s: already done, skipped", name)
      summaries[name] = utils.read_json(wd.done_marker(workdir, name))
      continue
    start = time.time()
    if multi and name in HOST_LOCAL and not distributed.is_primary():
      # Process 0 runs it on its own devices; this process waits, then reads its artifacts.
      logging.info("stage %s: waiting for process 0", name)
      distributed.barrier(f"sigma-stage-{name}-done")
      if not wd.is_done(workdir, name):
        raise RuntimeError(f"stage {name}: process 0 finished without "
                           f"{wd.done_marker(workdir, name)}; is the work directory shared by "
                           "every process?")
      summaries[name] = utils.read_json(wd.done_marker(workdir, name))
      continue
    logging.info("stage %s: running", name)
    summary = STAGES[name](cfg, workdir) or {}
    summary = dict(summary, stage=name, wall_time_s=round(time.time() - start, 3))
    utils.write_json(wd.recipe_path(workdir, name), recipe(cfg, name, workdir))
    utils.write_json(wd.done_marker(workdir, name), summary)  # process 0 only
    summaries[name] = summary
    if multi:
      distributed.barrier(f"sigma-stage-{name}-done")
  return summaries
