"""The two JustForYou training layouts (`sft.layout`) hold the same targets.

layout 'sequence': one sequence per user (its last H+1 training items), a target at every
history item after the first, in the history region of the prompt. layout 'per_position': one
example per training position (capped per user), its target after `<|end|> <|start|>`, where
evaluation prompts put it.
"""
import collections

import numpy as np

from configs import demo
from sigma_jax.data import loader, text
from sigma_jax.data.splits import PAD_ITEM
from sigma_jax.train import sft


def test_every_position_and_per_position_examples(demo_workdir):
  cfg = demo.get_config()
  cfg.sft.tasks = "justforyou"
  cfg.tasks.max_train_per_user = 0  # every training position
  assets = sft.load_assets(cfg, demo_workdir)
  ds = loader.load_dataset(cfg, demo_workdir)
  h = int(cfg.dataset.max_history)
  end = assets.tok.special[text.END]

  cfg.sft.layout = "sequence"
  seq_examples, seq_counts = sft.training_examples(cfg, ds, assets)
  cfg.sft.layout = "per_position"
  pos_examples, pos_counts = sft.training_examples(cfg, ds, assets)

  seqs = [np.asarray(s) for s in ds.splits.train_seqs if len(s) >= 2]
  assert seq_counts == {"justforyou": len(seqs)}
  assert pos_counts["justforyou"] == len(pos_examples) > len(seq_examples)

  # every_position: the last H+1 items, all but the first a target; only the final one is
  # placed after <|end|> <|start|>.
  seq_targets = collections.Counter()
  for ex, s in zip(seq_examples, seqs):
    tail = s[-(h + 1):]
    np.testing.assert_array_equal(ex.history, tail[:-1])
    assert ex.target == tail[-1] and ex.every_position
    a = sft.example_prompt(ex, assets)
    q = a["q_items"][a["q_items"] >= 0]
    np.testing.assert_array_equal(q, tail[1:])
    after_end = a["q_items"][int(np.flatnonzero(a["tokens"] == end)[0]):]
    assert (after_end >= 0).sum() == 1
    seq_targets.update(tail[1:].tolist())

  # per position: exactly one target, after <|end|>, the item following its history.
  pos_targets = collections.Counter()
  for ex in pos_examples:
    assert not ex.every_position
    a = sft.example_prompt(ex, assets)
    q_at = np.flatnonzero(a["q_items"] >= 0)
    assert len(q_at) == 1 and q_at[0] > np.flatnonzero(a["tokens"] == end)[0]
    assert a["q_items"][q_at[0]] == ex.target
    hist = np.asarray(ex.history)
    assert (hist != PAD_ITEM).sum() >= 1
    pos_targets[ex.target] += 1

  # The per-position set holds every target of the sequence layout (and, for users whose
  # training sequence is longer than H+1, the earlier positions too).
  assert not seq_targets - pos_targets
