"""Validation diagnostics behind choices in docs/RESULTS.md (CLI: ``launch/diagnose.py``).

Each function returns the lines of a Markdown table.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax.checkpoint import Checkpointer
from sigma_jax.data import loader
from sigma_jax.eval import stage as eval_stage
from sigma_jax.eval.metrics import ranking_metrics
from sigma_jax.train import collab, sft


def collab_cosine(cfg, workdir: str, splits) -> list:
  """SASRec's best-epoch parameters ranked by h·e_i (as trained) and by h·e_i/|e_i| (cosine)."""

  sp = loader.load_dataset(cfg, workdir).splits
  ccfg, n = cfg.collab, sp.num_items
  tx = collab.make_optimizer(float(ccfg.learning_rate), float(ccfg.weight_decay))
  _, abstract, _ = collab._state_fns(n, ccfg, int(cfg.seed), tx)
  with Checkpointer(os.path.join(workdir, "collab", "ckpt"), max_to_keep=2, local=True) as ck:
    restored = ck.restore(abstract)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/collab/ckpt holds no checkpoint")
  params = restored[1]["best_params"]
  graphdef = nnx.split(nnx.eval_shape(lambda: collab.build_model(n, ccfg, int(cfg.seed))),
                       nnx.Param)[0]
  exclude = collab.exclude_history(cfg)

  @jax.jit
  def top(params, hist, cosine):
    model = nnx.merge(graphdef, params)
    h, e = model(hist)[:, -1], model.item_embeddings()
    e = jnp.where(cosine, e / jnp.linalg.norm(e, axis=1, keepdims=True), e)
    s = h @ e.T
    return jax.lax.top_k(collab.mask_history(s, hist) if exclude else s, 20)[1]

  data = {"validation": (sp.valid_hist, sp.valid_target), "test": (sp.test_hist, sp.test_target)}
  norms = np.linalg.norm(np.asarray(nnx.merge(graphdef, params).item_embeddings()), axis=1)
  counts = np.bincount(np.concatenate(sp.train_seqs), minlength=n)
  print(f"corr(|e_i|, log(1 + train count_i)) = "
        f"{np.corrcoef(norms, np.log1p(counts))[0, 1]:+.3f}")
  lines = ["| scoring | split | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|---|"]
  for cosine in (False, True):
    for split in splits:
      hist, target = data[split]
      hist = np.asarray(hist)[:, -int(ccfg.max_len):]
      rows = 256
      out = []
      for s in range(0, len(hist), rows):
        chunk = hist[s:s + rows]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk), 0)])
        out.append(np.asarray(top(params, pad, cosine))[:len(chunk)])
      r = ranking_metrics(np.concatenate(out), target, (5, 10), num_items=n)
      lines.append(f"| {'cosine' if cosine else 'dot (as trained)'} | {split} | "
                   f"{r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {r['recall@10']:.4f} | "
                   f"{r['ndcg@10']:.4f} |")
  return lines


def decoding(cfg, workdir: str, beams, top_ms, taus, limit: int | None) -> list:
  """Validation mean NDCG@10 and R@10 of a trained SIGMA model at each (K, M, τ)."""
  names = sft.task_list(cfg.generation.eval_tasks)
  lines = ["| K | M | τ | validation mean NDCG@10 | R@10 |", "|---|---|---|---|---|"]
  for k in beams:
    for m in top_ms:
      c = cfg.copy_and_resolve_references()
      c.generation.num_beams, c.generation.top_m = int(k), int(m)
      ds, gen, _ = eval_stage.load_generator(c, workdir)
      for tau in taus:
        res = eval_stage.evaluate(c, ds, gen, splits=("validation",), task_names=names,
                                  tau=float(tau), limit=limit or None, progress=False)
        ndcg = np.mean([r["validation"]["ndcg@10"] for r in res.values()])
        hr = np.mean([r["validation"]["hr@10"] for r in res.values()])
        lines.append(f"| {k} | {m} | {tau} | {ndcg:.4f} | {hr:.4f} |")
  return lines
