"""Validation diagnostics behind choices in docs/RESULTS.md (CLI: ``launch/diagnose.py``).

Each function returns the lines of a Markdown table.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax.data import loader
from sigma_jax.eval import tau as tau_lib
from sigma_jax.train import collab, sft


def collab_cosine(cfg, workdir: str, splits) -> list:
  """SASRec's best-epoch parameters ranked by h·e_i (as trained) and by h·e_i/|e_i| (cosine)."""
  sp = loader.load_dataset(cfg, workdir).splits
  n, max_len = sp.num_items, int(cfg.collab.max_len)
  graphdef, params, _ = collab.load_best(cfg, n, workdir)
  exclude = collab.exclude_history(cfg)

  @jax.jit
  def cosine_topk(params, hist):
    model = nnx.merge(graphdef, params)
    e = model.item_embeddings()
    s = model(hist)[:, -1] @ (e / jnp.linalg.norm(e, axis=1, keepdims=True)).T
    return jax.lax.top_k(collab.mask_history(s, hist) if exclude else s, max(collab.KS))[1]

  norms = np.linalg.norm(np.asarray(nnx.merge(graphdef, params).item_embeddings()), axis=1)
  counts = np.bincount(np.concatenate(sp.train_seqs), minlength=n)
  print(f"corr(|e_i|, log(1 + train count_i)) = "
        f"{np.corrcoef(norms, np.log1p(counts))[0, 1]:+.3f}")
  data = {"validation": (sp.valid_hist, sp.valid_target), "test": (sp.test_hist, sp.test_target)}
  scorings = (("dot (as trained)", collab.make_topk_fn(graphdef, max(collab.KS), exclude)),
              ("cosine", cosine_topk))
  lines = ["| scoring | split | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|---|"]
  for name, topk_fn in scorings:
    for split in splits:
      r = collab.evaluate(topk_fn, params, *data[split], max_len, n)
      lines.append(f"| {name} | {split} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | "
                   f"{r['recall@10']:.4f} | {r['ndcg@10']:.4f} |")
  return lines


def decoding(cfg, workdir: str, beams, top_ms, taus, limit: int | None,
             item_priors=None) -> list:
  """Validation mean NDCG@10 and R@10 of a trained SIGMA model at each (K, M, λ, τ).

  λ is ``generation.item_prior`` (``item_priors``; None: the config's). Each (K, M, λ) is one
  ``tau.sweep`` (cached in WORKDIR/tau_sweep.json, so the comparison's own sweep at the same
  settings is reused).
  """
  names = sft.task_list(cfg.generation.eval_tasks)
  priors = [cfg.generation.get("item_prior", 0.0)] if item_priors is None else item_priors
  lines = ["| K | M | λ (item prior) | τ | validation mean NDCG@10 | R@10 |",
           "|---|---|---|---|---|---|"]
  for k in beams:
    for m in top_ms:
      for lam in priors:
        c = cfg.copy_and_resolve_references()
        c.generation.num_beams, c.generation.top_m = int(k), int(m)
        c.generation.item_prior = float(lam)
        res = tau_lib.sweep(c, workdir, taus, limit=limit or None, tasks=names)
        for tau in taus:
          by_task = res["metrics"][tau_lib.key(tau)]
          ndcg = np.mean([r["ndcg@10"] for r in by_task.values()])
          hr = np.mean([r["hr@10"] for r in by_task.values()])
          lines.append(f"| {k} | {m} | {lam} | {tau} | {ndcg:.4f} | {hr:.4f} |")
  return lines
