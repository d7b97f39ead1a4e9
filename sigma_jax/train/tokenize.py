"""Stage ``tokenize``: semantic IDs from the grounded item embeddings (DESIGN §1.2).

Writes to ``WORKDIR/tokenize``: ``sids.npy`` [N, L(+1)] (the full SID, with the de-duplication
level when ``tokenizer.dedup``), ``buckets.npz`` (prefix id of each item, the padded
prefix -> items table, bucket sizes, the prefixes) and ``report.json`` (codebook usage per level,
full-SID collision rate before and after de-duplication, bucket sizes).

``tokenizer.source`` picks the embeddings: 'grounded' (the ``ground`` stage's output) or 'raw'
(TF-IDF text embeddings: the `sigma_no_grounding` ablation). The stage takes seconds with
RQ-KMeans and about a minute with the RQ-VAE on Beauty; a killed run simply reruns it, with the
same seed and so the same SIDs.
"""
from __future__ import annotations

import os

import numpy as np

from sigma_jax import pipeline, utils
from sigma_jax.models import rq

SOURCES = {"grounded": "item_text_emb.npy", "raw": "raw_text_emb.npy"}


def check_config(tok_cfg, num_items: int | None = None) -> None:
  """Contradictory tokenizer settings are errors, said before any work.

  With ``num_items`` None (the catalogue not built yet) only the data-free checks run.
  """
  levels, size, prefix = int(tok_cfg.levels), int(tok_cfg.codebook_size), int(tok_cfg.prefix_len)
  if levels < 1:
    raise ValueError(f"tokenizer.levels must be >= 1, got {levels}")
  if not 0 <= prefix <= levels:
    raise ValueError(f"tokenizer.prefix_len={prefix} must be between 0 and tokenizer.levels="
                     f"{levels} (the SID depth)")
  if num_items is None:
    return
  if size > num_items:
    raise ValueError(f"tokenizer.codebook_size={size} is larger than the catalogue ({num_items} "
                     "items): most codes could never be used; lower it")
  if not tok_cfg.dedup and size ** levels < num_items:
    raise ValueError(f"tokenizer: {size}^{levels} = {size ** levels} codes cannot name "
                     f"{num_items} items distinctly; raise codebook_size or levels, or set "
                     "tokenizer.dedup=True")


def load(workdir: str) -> dict:
  """The tokenize stage's arrays: sids, prefix_ids, bucket_table, bucket_sizes, prefixes."""
  d = os.path.join(workdir, "tokenize")
  if not os.path.exists(os.path.join(d, "sids.npy")):
    raise FileNotFoundError(f"{d}/sids.npy is missing: run the 'tokenize' stage first")
  out = dict(np.load(os.path.join(d, "buckets.npz")))
  out["sids"] = np.load(os.path.join(d, "sids.npy"))
  out["report"] = utils.read_json(os.path.join(d, "report.json"))
  return out


@pipeline.stage("tokenize")
def run_tokenize(cfg, workdir: str) -> dict:
  t = cfg.tokenizer
  source = t.get("source", "grounded")
  if source not in SOURCES:
    raise ValueError(f"tokenizer.source must be one of {sorted(SOURCES)}, got {source!r}")
  path = os.path.join(workdir, "ground", SOURCES[source])
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the 'ground' stage before 'tokenize'")
  x = np.load(path)
  check_config(t, len(x))
  out = rq.tokenize_items(x, t, seed=int(cfg.seed))
  d = os.path.join(workdir, "tokenize")
  report = dict(out["report"], source=source, num_items=int(len(x)))
  utils.save_npy(os.path.join(d, "codes.npy"), out["codes"])
  utils.save_npy(os.path.join(d, "sids.npy"), out["sids"])
  utils.atomic_write(os.path.join(d, "buckets.npz"), lambda f: np.savez(
      f, prefix_ids=out["prefix_ids"], bucket_table=out["bucket_table"],
      bucket_sizes=out["bucket_sizes"], prefixes=out["prefixes"]), "wb")
  if out["train_info"]:
    utils.write_json(os.path.join(d, "train_info.json"), out["train_info"])
  utils.write_json(os.path.join(d, "report.json"), report)
  return {k: report[k] for k in ("usage_per_level", "collision_rate_before",
                                 "collision_rate_after", "bucket_size_max", "bucket_size_mean")}
