"""Soft constraints (issue 24): Category and Query evaluated with the instruction alone
(`generation.constraints='soft'`), and the no-instruction baseline
(`generation.instruction='none'`); the rows sigma_soft, sigma_no_instruction and popular_soft.

Stub generators, a faked pipeline and a random-init tiny model: no work directory.
"""
import os
import types

import numpy as np
from flax import nnx

from configs import base, demo
from sigma_jax import experiment, utils
from sigma_jax.eval import compare, evaluate
from sigma_jax.generate import generator as gen_lib
from sigma_jax.train import sft

from conftest import synthetic_assets

ITEMS = 40


class _Recorder:
  """A generator stand-in that records what each call was given."""

  def __init__(self):
    self.spec = types.SimpleNamespace(top_n=3)
    self.calls = []

  def recommend(self, histories, instructions, allowed, tau=None):
    self.calls.append((list(instructions), allowed))
    return types.SimpleNamespace(items=np.zeros((len(histories), 3), np.int32))


def _category_examples(n=4):
  allowed = np.zeros((n, ITEMS), bool)
  allowed[:, :5] = True
  return types.SimpleNamespace(
      target=np.zeros(n), history=np.tile(np.arange(3, dtype=np.int32), (n, 1)),
      task="category", split="validation", hard_constraint=True,
      instruction=[f"something in category {i}" for i in range(n)],
      allowed_batch=lambda rows: allowed[:len(rows)])


def test_soft_ranking_passes_no_constraint_and_keeps_the_instruction():
  ex = _category_examples()
  hard, soft, none = _Recorder(), _Recorder(), _Recorder()
  evaluate.rank_examples(hard, ex, batch_size=4)
  evaluate.rank_examples(soft, ex, batch_size=4, hard=False)
  evaluate.rank_examples(none, ex, batch_size=4, hard=False, instruction=False)
  (h_text, h_allowed), = hard.calls
  (s_text, s_allowed), = soft.calls
  (n_text, n_allowed), = none.calls
  assert h_allowed is not None and h_allowed.shape == (4, ITEMS)
  assert s_allowed is None and n_allowed is None
  assert h_text == s_text == ex.instruction
  assert n_text == [""] * 4


def test_soft_decoding_can_leave_the_constraint_hard_cannot():
  """A random tiny model asked for 5 of 40 items: under the hard filter every returned item is
  one of them; without it (soft) the lists hold others too, and an empty instruction decodes."""
  cfg, assets = synthetic_assets("sigma", items=ITEMS)
  graphdef, params = nnx.split(sft._new_model(cfg, assets))
  gen = gen_lib.Generator(cfg, assets, graphdef, params)
  hist = np.array([[-1, 20, 30], [-1, 25, 35]], np.int32)
  allowed = np.zeros((2, ITEMS), bool)
  allowed[:, :5] = True
  hard = np.asarray(gen.recommend(hist, [[900, 901]] * 2, allowed).items)
  soft = np.asarray(gen.recommend(hist, [[900, 901]] * 2, None).items)
  empty = np.asarray(gen.recommend(hist, ["", ""], None).items)
  assert (hard >= 0).any() and (hard[hard >= 0] < 5).all()
  assert (soft[soft >= 0] >= 5).any()
  assert (empty >= 0).all(axis=1).any()


def test_soft_rows_reuse_sigma_and_popular_soft_ignores_the_constraint(tmp_path, monkeypatch):
  runs, popular, tasks_of = [], [], {}

  def fake_pipeline(cfg, rdir, strict=False):
    runs.append((os.path.basename(rdir), cfg.stages, cfg.generation.constraints,
                 cfg.generation.instruction))
    tasks_of[os.path.basename(rdir)] = cfg.generation.eval_tasks
    for st in str(cfg.stages).split(","):
      os.makedirs(os.path.join(rdir, st), exist_ok=True)
    if cfg.stages == "eval":
      utils.write_json(os.path.join(rdir, "eval", "metrics.json"), {"tasks": {}})

  def fake_popular(cfg, workdir, row):
    popular.append((row, cfg.generation.constraints))
    tasks_of[row] = cfg.generation.eval_tasks
    os.makedirs(os.path.join(compare.row_dir(workdir, row), "eval"), exist_ok=True)
    utils.write_json(os.path.join(compare.row_dir(workdir, row), "eval", "metrics.json"),
                     {"wall_time_s": 0.0})
    return {}

  monkeypatch.setattr(experiment.pipeline, "run", fake_pipeline)
  monkeypatch.setattr(compare, "popular_row", fake_popular)
  monkeypatch.setattr(compare, "select_tau",
                      lambda cfg, rdir, taus, tau_limit=0: {"chosen_tau": float(taus[0])})
  monkeypatch.setattr(compare, "result", lambda *a, **k: {})
  monkeypatch.setattr(compare, "model_row", lambda res, per_task: res["tau"])
  w = str(tmp_path)
  experiment.run(demo.get_config(), w, ["sigma_no_instruction", "popular_soft", "sigma_soft",
                                        "popular", "sigma"], ["0.01"],
                 configure=base.apply_variant)
  assert popular == [("popular", "hard"), ("popular_soft", "soft")]
  evals = [r for r in runs if r[1] == "eval"]
  assert evals == [("sigma", "eval", "hard", "given"), ("sigma_soft", "eval", "soft", "given"),
                   ("sigma_no_instruction", "eval", "soft", "none")]
  assert [r[0] for r in runs if r[1] == "sft"] == ["sigma"]  # trained once, reused by both
  # Soft rows evaluate only the tasks whose constraint they relax; the others every task.
  tasks_of.pop(os.path.basename(w))  # the shared stages' run
  assert tasks_of == {"popular": "", "popular_soft": "query,category", "sigma": "",
                      "sigma_soft": "query,category", "sigma_no_instruction": "query,category"}
  for row in ("sigma_soft", "sigma_no_instruction"):
    link = os.path.join(compare.row_dir(w, row), "sft")
    assert os.path.realpath(link) == os.path.realpath(os.path.join(compare.row_dir(w, "sigma"),
                                                                   "sft"))


def test_tau_sweep_ranks_as_the_row_evaluates(monkeypatch):
  """A soft row's τ is chosen under soft decoding (and the no-instruction row's without the
  instruction), and each decoding has its own entry in the sweep cache."""
  from sigma_jax.data import tasks as tasks_lib
  from sigma_jax.eval import tau as tau_lib

  seen = []

  def fake_rank(gen, ex, batch, tau=None, hard=True, instruction=True, **_):
    seen.append((hard, instruction))
    return np.zeros((len(ex.target), 3), np.int32)

  ex = _category_examples()
  monkeypatch.setattr(evaluate, "rank_examples", fake_rank)
  monkeypatch.setattr(evaluate, "task_metrics", lambda ranked, ex, ds, extras: {})
  monkeypatch.setattr(tasks_lib, "item_categories", lambda ds: (None, np.zeros((ITEMS, 2))))
  monkeypatch.setattr(tasks_lib, "tail_items", lambda splits, share: np.zeros(ITEMS, bool))
  monkeypatch.setattr(tasks_lib, "build_tasks", lambda *a, **k: {"category": ex})
  ds = types.SimpleNamespace(splits=None)
  keys = []
  for variant in ("sigma", "sigma_soft", "sigma_no_instruction"):
    cfg = base.apply_variant(demo.get_config(), variant)
    tau_lib._evaluate(cfg, (ds, None, 0), [0.01], None, None)
    keys.append(tau_lib.settings(cfg, "/nonexistent"))
  assert seen == [(True, True), (False, True), (False, False)]
  assert len({str(sorted(k.items())) for k in keys}) == 3
  assert "constraints" not in keys[0] and "instruction" not in keys[0]  # old caches still hit
