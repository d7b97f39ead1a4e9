"""Semantic IDs: the settings the ``tokenize`` stage checks and the artifacts it leaves.

The stage (``sigma_jax.stages.tokenize``) makes SIDs from the grounded item embeddings
(DESIGN §1.2) with ``models.rq`` and writes to ``WORKDIR/tokenize``: ``sids.npy`` [N, L(+1)] (the full SID, with the de-duplication
level when ``tokenizer.dedup``), ``buckets.npz`` (prefix id of each item, the padded
prefix -> items table, bucket sizes, the prefixes) and ``report.json`` (codebook usage per level,
full-SID collision rate before and after de-duplication, bucket sizes).

``tokenizer.source`` picks the embeddings: 'grounded' (the ``ground`` stage's output) or 'raw'
(TF-IDF text embeddings: the `sigma_no_grounding` ablation). The stage takes seconds with
RQ-KMeans and about a minute with the RQ-VAE on Beauty; a killed run simply reruns it, with the
same seed and so the same SIDs.
"""
from __future__ import annotations

import numpy as np

from sigma_jax import utils, workdir as wd
from sigma_jax.models import rq

# tokenizer.source -> the item embeddings the SIDs are made from.
SOURCES = {"grounded": wd.GROUND_TEXT_EMB, "raw": wd.GROUND_RAW_EMB}


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
  sids = np.load(wd.require(workdir, wd.TOKENIZE_SIDS, "tokenize"))
  out = dict(np.load(wd.path(workdir, wd.TOKENIZE_BUCKETS)))
  out["sids"] = sids
  out["report"] = utils.read_json(wd.path(workdir, wd.TOKENIZE_REPORT))
  return out
