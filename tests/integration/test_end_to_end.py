"""The whole pipeline on the bundled demo sample: every stage, all seven tasks, rerun skips."""
import json
import os
import time

import numpy as np

from conftest import FAST_DEMO, run_train
from sigma_jax.data import tasks
from sigma_jax.eval import metrics

STAGES = ("data", "text_tokenizer", "collab", "ground", "tokenize", "sft", "eval")


def test_every_stage_done_and_all_tasks_evaluated(demo_workdir):
  for stage in STAGES:
    assert os.path.exists(os.path.join(demo_workdir, stage, "DONE.json")), stage
  with open(os.path.join(demo_workdir, "eval", "metrics.json")) as f:
    m = json.load(f)
  assert set(m["tasks"]) == set(tasks.TASKS)
  for task, per_split in m["tasks"].items():
    assert set(per_split) == {"validation", "test"}, task
    for split, r in per_split.items():
      assert r["invalid_share"] == 0.0, (task, split)
      assert 0.0 <= r["hr@1"] <= r["hr@5"] <= r["hr@10"] <= r["hr@20"] <= 1.0
      assert r["ndcg@10"] <= r["hr@10"] + 1e-9
      if task in tasks.HARD_CONSTRAINT_TASKS:
        # Constrained decoding: every returned item satisfies the instruction.
        assert r["constraint_satisfaction@10"] == 1.0, (task, split)
  # Per-example target ranks (for paired tests) agree with the reported metrics.
  ranks = np.load(os.path.join(demo_workdir, "eval", "ranks.npz"))
  assert set(ranks.files) == {f"{t}/{s}" for t in m["tasks"] for s in ("validation", "test")}
  for key in ranks.files:
    task, split = key.split("/")
    r, want = ranks[key], m["tasks"][task][split]
    assert len(r) == want["num_examples"], key
    assert np.isclose(((r >= 0) & (r < 10)).mean(), want["hr@10"]), key
    assert np.isclose(metrics.ndcg_per_example(r, 10).mean(), want["ndcg@10"]), key
  with open(os.path.join(demo_workdir, "tokenize", "report.json")) as f:
    assert json.load(f)["collision_rate_after"] == 0.0
  with open(os.path.join(demo_workdir, "sft", "tasks.json")) as f:
    assert set(json.load(f)["counts"]) == set(tasks.TASKS)


def test_second_run_skips_every_stage(demo_workdir):
  start = time.time()
  out = run_train(demo_workdir, *FAST_DEMO)
  assert out.stderr.count("already done, skipped") == len(STAGES)
  assert time.time() - start < 60
