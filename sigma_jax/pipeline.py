"""The staged run: each stage reads earlier stages' artifacts in the work directory and writes
its own. A finished stage leaves ``WORKDIR/<stage>/DONE.json`` (written last, atomically) and is
skipped on the next run; an unfinished one resumes from its own checkpoints.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import time
from typing import Callable

from sigma_jax import distributed, utils

STAGES: dict[str, Callable] = {}
# The order stages run in, whatever order config.stages lists them in.
ORDER = ("data", "text_tokenizer", "collab", "pretrain", "ground", "tokenize", "sft", "eval")
# Stages that run on one host's devices: in a multi-process run process 0 runs them alone.
HOST_LOCAL = frozenset({"data", "text_tokenizer", "collab", "tokenize"})


def stage(name: str):
  """Registers ``fn(cfg, workdir) -> dict`` as stage ``name``."""
  if name not in ORDER:
    raise ValueError(f"stage {name!r} is not in the stage order {ORDER}")

  def register(fn):
    STAGES[name] = fn
    return fn
  return register


def parse_stages(spec) -> list[str]:
  """'data,collab' (or a list) -> stage names in run order; unknown names are an error."""
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  if not names:
    raise ValueError("config.stages is empty; name at least one stage, e.g. --config.stages=data")
  _register_all()
  unknown = [n for n in names if n not in STAGES]
  if unknown:
    raise ValueError(f"unknown or unavailable stage(s) {unknown}; available: "
                     f"{[s for s in ORDER if s in STAGES]}")
  return [s for s in ORDER if s in names]


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
# Logging and checkpoint cadence, inference batch sizes, sequence packing and data locations:
# they change how a stage runs, not what it computes.
_INCIDENTAL = frozenset({"log_every", "ckpt_every", "eval_batch", "encode_batch", "pack",
                         "tfds_dir", "manual_dir"})


# Config keys added after runs recorded their recipes, with the value that reproduces what those
# runs did: a recipe without the key equals one with this value.
_ADDED_DEFAULTS = {"sft.similarity": "cosine"}


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

  for stage_name in ORDER[:ORDER.index(name) + 1]:
    if stage_name == "pretrain" and name != "pretrain" and not is_done(workdir, "pretrain"):
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
  path = recipe_path(workdir, name)
  if not os.path.exists(path):
    return []
  before, now = utils.read_json(path), recipe(cfg, name, workdir)
  for k, v in _ADDED_DEFAULTS.items():
    if k in now:
      before.setdefault(k, v)
  return [f"{k}: {before.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}"
          for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def recipe_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "recipe.json")


def done_marker(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "DONE.json")


def is_done(workdir: str, name: str) -> bool:
  return os.path.exists(done_marker(workdir, name))


def run(cfg, workdir: str, strict: bool = False) -> dict:
  """Runs the stages of ``cfg.stages`` in order; returns each stage's summary.

  A finished stage is skipped. When the config it was run under (``recipe``) differs from
  ``cfg``, that is logged as a warning, or raised as a ValueError when ``strict``.
  """
  from sigma_jax import config_checks  # imported here: it imports the stage modules
  config_checks.validate(cfg, workdir)  # contradictions are errors before any work is done
  os.makedirs(workdir, exist_ok=True)
  summaries = {}
  multi = distributed.process_count() > 1
  for name in parse_stages(cfg.stages):
    if is_done(workdir, name):
      changes = recipe_changes(cfg, workdir, name)
      if changes:
        msg = (f"stage {name}: {os.path.join(workdir, name)} was finished under another config "
               f"({'; '.join(changes)}); its artifacts are what later stages read. Use a new "
               f"work directory, or delete that stage directory to re-run it.")
        if strict:
          raise ValueError(msg)
        logging.warning("%s Reusing it.", msg)
      logging.info("stage %s: already done, skipped", name)
      summaries[name] = utils.read_json(done_marker(workdir, name))
      continue
    start = time.time()
    if multi and name in HOST_LOCAL and not distributed.is_primary():
      # Process 0 runs it on its own devices; this process waits, then reads its artifacts.
      logging.info("stage %s: waiting for process 0", name)
      distributed.barrier(f"sigma-stage-{name}-done")
      if not is_done(workdir, name):
        raise RuntimeError(f"stage {name}: process 0 finished without {done_marker(workdir, name)}"
                           "; is the work directory shared by every process?")
      summaries[name] = utils.read_json(done_marker(workdir, name))
      continue
    logging.info("stage %s: running", name)
    summary = STAGES[name](cfg, workdir) or {}
    summary = dict(summary, stage=name, wall_time_s=round(time.time() - start, 3))
    utils.write_json(recipe_path(workdir, name), recipe(cfg, name, workdir))
    utils.write_json(done_marker(workdir, name), summary)  # process 0 only
    summaries[name] = summary
    if multi:
      distributed.barrier(f"sigma-stage-{name}-done")
  return summaries


_STAGE_MODULES = ("sigma_jax.data.stage", "sigma_jax.data.text", "sigma_jax.train.collab",
                  "sigma_jax.train.pretrain",
                  "sigma_jax.train.ground", "sigma_jax.train.tokenize", "sigma_jax.train.sft",
                  "sigma_jax.eval.stage")


def _register_all():
  # Importing a stage module registers its stages; one not written yet is simply unavailable.
  for mod in _STAGE_MODULES:
    if importlib.util.find_spec(mod) is not None:
      importlib.import_module(mod)
