"""Stage ``text_tokenizer``: a SentencePiece model over item texts and instruction phrasings."""
from __future__ import annotations

import numpy as np

from sigma_jax import utils, workdir as wd
from sigma_jax.data import loader, prompts, tasks, text


def run(cfg, workdir: str) -> dict:
  ds = loader.load_dataset(cfg, workdir)
  # Item texts plus every instruction phrasing, so instructions are in-vocabulary words.
  texts = ([it.text for it in ds.raw.items] + tasks.all_template_texts() +
           [prompts.HISTORY_VERB])
  path = text.model_path(workdir)
  text.train_spm(texts, int(cfg.text.vocab_size), path)
  tok = text.TextTokenizer(path)
  lengths = [len(x) for x in tok.sp.encode([it.text for it in ds.raw.items])]
  summary = {"spm_size": tok.spm_size, "item_text_tokens": {
      "mean": float(np.mean(lengths)), "p95": float(np.percentile(lengths, 95)),
      "max": int(np.max(lengths))}}
  utils.write_json(wd.path(workdir, wd.TEXT_SUMMARY), summary)
  return summary
