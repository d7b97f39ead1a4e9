"""Every task's metrics on validation and test, ranked by the on-device generator.

The ``eval`` stage (``sigma_jax.stages.eval``), the comparison's τ sweep and the diagnostics all
rank through ``evaluate``. Ranking metrics: HR@{1,5,10,20} (= Recall@K with one target),
NDCG@{5,10,20}; constrained tasks (Query, Category) add the share of recommendations that satisfy the constraint; exploratory
ones (Longtail, Discover) add category coverage, intra-list diversity and long-tail share. Every
list's share of invalid entries (unknown item, padding, duplicate) is reported and must be 0.
"""
from __future__ import annotations

import zlib

import numpy as np
from tqdm import tqdm

from sigma_jax import parallel
from sigma_jax.data import loader, tasks as tasks_lib
from sigma_jax.eval import metrics as M
from sigma_jax.generate import generator as gen_lib
from sigma_jax.train import sft

KS = (1, 5, 10, 20)


def rank_examples(gen: gen_lib.Generator, ex, batch_size: int, tau: float | None = None,
                  limit: int | None = None, progress: bool = False, hard: bool = True,
                  instruction: bool = True) -> np.ndarray:
  """[M, top_n] ranked items for a task's examples, in the examples' order.

  ``hard``: a task with a hard constraint (Category, Query) restricts decoding to its items;
  False: soft, nothing restricts decoding beyond history exclusion. ``instruction`` False: the
  prompts carry no instruction text.

  Batches hold examples of similar history length (a stable sort by length), so that
  `Generator.recommend` can cut each batch's prompts to its longest one; every batch has
  ``batch_size`` rows (the last is padded by repeating an example), so few shapes compile.
  """
  m = len(ex.target) if limit is None else min(limit, len(ex.target))
  hard = bool(ex.hard_constraint) and hard
  if m == 0:
    return np.zeros((0, gen.spec.top_n), np.int32)
  lengths = (np.asarray(ex.history[:m]) >= 0).sum(axis=1)
  order = np.argsort(lengths, kind="stable")
  out = np.full((m, gen.spec.top_n), -1, np.int32)
  for s in tqdm(range(0, m, batch_size), desc=f"eval {ex.task}/{ex.split}", leave=False,
                disable=not progress):
    rows = order[s:s + batch_size]
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    allowed = ex.allowed_batch(padded) if hard else None
    texts = [ex.instruction[i] if instruction else "" for i in padded]
    ranked = gen.recommend(ex.history[padded], texts, allowed, tau=tau)
    out[rows] = np.asarray(ranked.items)[:len(rows)]
  return out


def decoding_flags(g) -> dict:
  """``rank_examples``' ``hard`` and ``instruction`` as generation config ``g`` asks
  (``constraints``, ``instruction``): evaluation and the τ sweep rank the same way."""
  return {"hard": g.get("constraints", "hard") == "hard",
          "instruction": g.get("instruction", "given") == "given"}


def limit_examples(ex, limit: int | None, g=None):
  """At most ``limit`` of a task's examples (None: all of them), chosen as the generation config
  ``g`` says (``generation.eval_sample``; None: "first").

  "first": the first ``limit`` in file order. "random": a uniform sample without replacement,
  kept in file order, drawn from (``g.eval_sample_seed``, the task, the split): the same
  examples for every system ranked on that setting, so paired comparisons stay paired.
  """
  n = len(ex.target)
  if limit is None or limit >= n:
    return ex
  sample = "first" if g is None else g.get("eval_sample", "first")
  if sample == "first":
    rows = np.arange(limit)
  elif sample == "random":
    rng = np.random.default_rng([int(g.get("eval_sample_seed", 0)),
                                 zlib.crc32(ex.task.encode()), zlib.crc32(ex.split.encode())])
    rows = np.sort(rng.choice(n, size=int(limit), replace=False))
  else:
    raise ValueError(f"generation.eval_sample must be 'first' or 'random', got {sample!r}")
  return ex.subset(rows)


def sample_description(limit: int | None, g) -> str:
  """How ``limit_examples`` picks a task's examples under generation config ``g``, in words."""
  if limit is None:
    return "all"
  if g.get("eval_sample", "first") == "random":
    return f"random {limit} (seed {int(g.eval_sample_seed)})"
  return f"first {limit}"


def task_metrics(ranked: np.ndarray, ex, ds: loader.Dataset, extras: dict) -> dict:
  """Metrics of one task's ranked lists.

  A list can be shorter than N when the instruction allows fewer items (a narrow Query): the
  empty slots (-1) are reported as `padding_share`, and the constraint and exploration shares
  are taken over the filled slots. `invalid_share` counts real errors only — an unknown item or
  a repeated one — and is 0 by construction.
  """
  n = ds.num_items
  target = ex.target[:len(ranked)]
  out = M.ranking_metrics(ranked, target, KS, num_items=n)
  filled = ranked >= 0
  out["padding_share"] = float(1.0 - filled.mean()) if ranked.size else 0.0
  out["invalid_share"] = float((~M.valid_mask(ranked, n) & filled).mean()) if ranked.size else 0.0
  out["num_examples"] = int(len(ranked))
  top10 = ranked[:, :10]
  filled10 = top10 >= 0
  if ex.task in tasks_lib.HARD_CONSTRAINT_TASKS:
    allowed = ex.allowed_batch(np.arange(len(ranked)))  # [M, N]
    ok = np.take_along_axis(allowed, np.maximum(top10, 0), axis=1) & filled10
    out["constraint_satisfaction@10"] = float(ok.sum() / max(1, filled10.sum()))
  if ex.task in ("longtail", "discover"):
    out["category_coverage@10"] = M.category_coverage(top10, extras["membership"],
                                                      extras["membership"].shape[1])
    out["intra_list_diversity@10"] = M.intra_list_diversity(top10, extras["membership"])
    out["long_tail_share@10"] = float(
        (extras["tail"][np.maximum(top10, 0)] & filled10).sum() / max(1, filled10.sum()))
  return out


def evaluate(cfg, ds, gen, splits=("validation", "test"), task_names=None, tau=None,
             limit=None, progress=True, ranks_out: dict | None = None) -> dict:
  """{task: {split: metrics}} for every available task (or `task_names`).

  With ``ranks_out`` (a dict), also fills ``ranks_out["<task>/<split>"]`` with each example's
  0-based rank of its target (-1: not in the list), for paired comparisons between systems.
  """
  _, membership = tasks_lib.item_categories(ds)
  extras = {"membership": membership,
            "tail": tasks_lib.tail_items(ds.splits, cfg.tasks.longtail_head_share)}
  results = {}
  for split in splits:
    built = tasks_lib.build_tasks(ds, cfg.tasks, split, tasks=task_names)
    for name, ex in built.items():
      if not len(ex.target):
        continue
      ex = limit_examples(ex, limit, cfg.generation)
      ranked = rank_examples(gen, ex, int(cfg.generation.eval_batch), tau, None, progress,
                             **decoding_flags(cfg.generation))
      results.setdefault(name, {})[split] = task_metrics(ranked, ex, ds, extras)
      if ranks_out is not None:
        ranks_out[f"{name}/{split}"] = M.target_rank(ranked, ex.target[:len(ranked)])
  return results


def load_generator(cfg, workdir: str, mode=None, fuse=None):
  ds = loader.load_dataset(cfg, workdir)
  assets = sft.load_assets(cfg, workdir)
  mesh = parallel.make_mesh(cfg.mesh)
  graphdef, params, step = sft.load_params(cfg, workdir, assets, mesh)
  counts = (tasks_lib.train_popularity(ds.splits)  # only generation.item_prior reads them
            if cfg.generation.get("item_prior", 0.0) else None)
  return ds, gen_lib.Generator(cfg, assets, graphdef, params, mode=mode, fuse=fuse,
                               item_counts=counts), step
