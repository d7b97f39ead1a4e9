"""The layout of a work directory: every artifact path and the per-stage markers, in one place.

A stage ``S`` writes under ``WORKDIR/S/`` and, when finished, ``WORKDIR/S/DONE.json`` (its summary,
written last) and ``WORKDIR/S/recipe.json`` (the config values its artifacts depend on). Later
stages and the tools around them (evaluation, serving, comparison, plots) find earlier stages'
artifacts through the functions here, never by spelling a path themselves.

This module is a leaf: it imports nothing from the package.
"""
from __future__ import annotations

import os

# Artifact paths, relative to the work directory.
DATA_STATS = "data/stats.json"
TFDS = "tfds"  # the default place of the TFDS dataset (dataset.tfds_dir overrides it)
SPM_MODEL = "text_tokenizer/spm.model"
TEXT_SUMMARY = "text_tokenizer/summary.json"
COLLAB_ITEM_EMB = "collab/item_emb.npy"  # the frozen v_ID table [N, D]
COLLAB_RESULT = "collab/result.json"
PRETRAIN_BACKBONE = "pretrain/backbone"
GROUND_TEXT_EMB = "ground/item_text_emb.npy"  # grounded item embeddings [N, E]
GROUND_RAW_EMB = "ground/raw_text_emb.npy"  # TF-IDF + PCA, un-grounded [N, E]
GROUND_TOWER = "ground/tower"  # the text tower's decoder at the best-validation step (Orbax)
TOKENIZE_SIDS = "tokenize/sids.npy"
TOKENIZE_BUCKETS = "tokenize/buckets.npz"
TOKENIZE_REPORT = "tokenize/report.json"
SFT_TASKS = "sft/tasks.json"
EVAL_METRICS = "eval/metrics.json"
EVAL_RANKS = "eval/ranks.npz"
PLOTS = "plots"


def path(workdir: str, rel: str) -> str:
  """``WORKDIR/rel`` for one of the artifact paths above."""
  return os.path.join(workdir, rel)


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def ckpt_dir(workdir: str, stage: str) -> str:
  """Where a training stage keeps its Orbax checkpoints."""
  return os.path.join(workdir, stage, "ckpt")


def metrics_log(workdir: str, stage: str) -> str:
  """A training stage's JSON-lines metrics log."""
  return os.path.join(workdir, stage, "metrics.jsonl")


def tensorboard_dir(workdir: str, stage: str) -> str:
  """A training stage's TensorBoard event files (``tensorboard --logdir WORKDIR`` shows them)."""
  return os.path.join(workdir, stage, "tensorboard")


def done_marker(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "DONE.json")


def recipe_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "recipe.json")


def is_done(workdir: str, stage: str) -> bool:
  return os.path.exists(done_marker(workdir, stage))


def require(workdir: str, rel: str, stage: str) -> str:
  """The path of an artifact a later step needs; FileNotFoundError naming the stage to run."""
  p = path(workdir, rel)
  if not os.path.exists(p):
    raise FileNotFoundError(f"{p} is missing: run the '{stage}' stage first")
  return p
