"""launch.compare's tables: the numbers in the Markdown are the JSON's, per task and averaged."""
from launch import compare


def _m(hr10, ndcg10, n, **extra):
  return dict({"hr@1": hr10 / 4, "hr@5": hr10 / 2, "hr@10": hr10, "hr@20": hr10 * 1.5,
               "ndcg@10": ndcg10, "num_examples": n}, **extra)


def _rows():
  sigma = {"validation": {"justforyou": _m(.2, .1, 50), "query": _m(.8, .6, 40)},
           "test": {"justforyou": _m(.3, .15, 50),
                    "query": _m(.9, .7, 40, **{"constraint_satisfaction@10": 1.0})},
           "apf": {"chosen_tau": 0.003}}
  gr_id = {"validation": {"justforyou": _m(.1, .05, 50), "query": _m(.5, .3, 40)},
           "test": {"justforyou": _m(.1, .05, 50), "query": _m(.7, .5, 40)},
           "apf": None}
  collab = {"validation": {"hr@10": .25, "ndcg@10": .12},
            "test": {"hr@1": .01, "hr@5": .05, "hr@10": .2, "hr@20": .3, "ndcg@10": .11,
                     "recall@10": .2}}
  return {"collab": collab, "sigma": sigma, "gr_id": gr_id}


def _table(md: str, title: str) -> list:
  """The data lines of the table under the line starting with ``title``."""
  lines = md.splitlines()
  i = next(k for k, line in enumerate(lines) if line.startswith(title))
  out = []
  for line in lines[i + 1:]:
    if line.startswith("## "):
      break
    if line.startswith("| ") and not line.startswith("| row"):
      out.append([c.strip() for c in line.strip("|").split("|")])
  return out


def test_per_task_tables_and_mean():
  md = compare._markdown("demo", _rows(), per_task=True)
  summary = {r[0]: r[1:] for r in _table(md, "Mean over the 2 tasks")}
  # collab has no instruction tasks, so it has no mean; the others average the two tasks.
  assert set(summary) == {"sigma", "gr_id"}
  assert summary["sigma"] == ["0.6000", "0.4250", "0.3500"]
  assert summary["gr_id"] == ["0.4000", "0.2750", "0.1750"]
  jfy = {r[0]: r[1:] for r in _table(md, "## justforyou (50 test examples)")}
  assert set(jfy) == {"collab", "sigma", "gr_id"}  # SASRec is a next-item model: JustForYou
  assert jfy["collab"] == ["0.0100", "0.0500", "0.2000", "0.3000", "0.1100"]
  assert jfy["sigma"][2] == "0.3000"
  query = {r[0]: r[1:] for r in _table(md, "## query (40 test examples)")}
  assert set(query) == {"sigma", "gr_id"}
  assert query["sigma"][-1] == "1.0000"
  assert query["gr_id"][-1] == "—"  # a metric a row lacks is shown as missing, not as 0


def test_single_task_table():
  rows = {"collab": {"test": {"recall@5": .01, "ndcg@5": .02, "recall@10": .03, "ndcg@10": .04}},
          "sigma": {"test": {"recall@5": .05, "ndcg@5": .06, "recall@10": .07, "ndcg@10": .08}}}
  md = compare._markdown("beauty", rows, per_task=False)
  got = {r[0]: r[1:] for r in _table(md, "# beauty")}
  assert got == {"collab": ["0.0100", "0.0200", "0.0300", "0.0400"],
                 "sigma": ["0.0500", "0.0600", "0.0700", "0.0800"]}


def test_paired_bootstrap_between_rows(tmp_path):
  import os

  import numpy as np

  def save(row, **ranks):
    d = tmp_path / "rows" / row / "eval"
    os.makedirs(d)
    np.savez(d / "ranks.npz", **ranks)

  n = 300
  rng = np.random.default_rng(0)
  sigma_jfy = rng.integers(-1, 20, n)
  # gr_id is sigma with every JustForYou hit pushed out of the list: sigma is better on that
  # task for sure; on Query the two are identical.
  save("sigma", **{"justforyou/test": sigma_jfy, "justforyou/validation": sigma_jfy[:10],
                   "query/test": np.arange(n) % 12})
  save("gr_id", **{"justforyou/test": np.full(n, -1), "query/test": np.arange(n) % 12})
  rows = {"collab": {}, "sigma": {}, "gr_id": {}, "gr_sid": {}}
  out = compare._paired(str(tmp_path), rows)
  assert out["missing"] == ["gr_sid"]  # no ranks.npz: listed, not silently dropped
  assert set(out["rows"]) == {"gr_id"} and set(out["rows"]["gr_id"]) == {"justforyou", "query"}
  jfy = out["rows"]["gr_id"]["justforyou"]
  hit = (sigma_jfy >= 0) & (sigma_jfy < 10)
  want = np.where(hit, 1 / np.log2(np.maximum(sigma_jfy, 0) + 2), 0).mean()
  assert np.isclose(jfy["diff"], want) and jfy["ci95_low"] > 0
  assert out["rows"]["gr_id"]["query"]["diff"] == 0.0
  md = compare._paired_markdown(out)
  line = next(x for x in md.splitlines() if x.startswith("| gr_id"))
  assert f"+{want:.4f}*" in line  # significant: starred
  assert "+0.0000 [+0.0000, +0.0000]" in line  # identical: no star
  assert "No per-example ranks for: gr_sid" in md


def test_selection_table_marks_the_chosen_tau():
  sweeps = {"collab": {"validation": {}, "test": {}},  # not a sweep: left out
            "sigma": {"validation_mean_ndcg@10": {"0.001": .031, "0.003": .029},
                      "chosen_tau": 0.001, "validation_examples_per_task": 3000},
            "sigma_no_apf": {"reuses_sft_of": "sigma"}}
  lines = compare._selection_markdown(sweeps).splitlines()
  assert lines[2:] == ["| sigma | 0.001 (chosen) | 0.0310 | 3000 |",
                       "| sigma | 0.003 | 0.0290 | 3000 |"]


def test_tau_sweep_cache_follows_the_grid(tmp_path, monkeypatch):
  """A re-run with a wider grid evaluates only the new τ values and chooses among the grid it
  was given; a cache made on another number of validation examples is recomputed."""
  import ml_collections
  from absl import flags

  from sigma_jax.eval import stage as eval_stage

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  score = {0.001: .02, 0.003: .03, 0.01: .025, 0.03: .04}
  calls = []

  def fake_evaluate(cfg, ds, gen, splits, task_names, tau, limit, progress):
    calls.append((tau, limit))
    return {"justforyou": {"validation": {"ndcg@10": score[tau]}}}

  monkeypatch.setattr(eval_stage, "load_generator", lambda cfg, rdir: (None, None, 0))
  monkeypatch.setattr(eval_stage, "evaluate", fake_evaluate)
  cfg = ml_collections.ConfigDict({"generation": {"eval_limit": 0, "eval_tasks": ""}})
  flag = flags.FLAGS["tau_limit"]
  monkeypatch.setattr(flag, "value", 100)

  first = compare._select_tau(cfg, str(tmp_path), ["0.001", "0.003"])
  assert first["chosen_tau"] == 0.003 and calls == [(0.001, 100), (0.003, 100)]
  calls.clear()
  # A narrower grid is answered from the cache and chooses among its own values only.
  narrow = compare._select_tau(cfg, str(tmp_path), ["0.001"])
  assert calls == [] and narrow["chosen_tau"] == 0.001
  assert narrow["validation_mean_ndcg@10"] == {"0.001": .02}
  # A wider grid evaluates only what the cache lacks.
  wide = compare._select_tau(cfg, str(tmp_path), ["0.001", "0.003", "0.01"])
  assert calls == [(0.01, 100)] and wide["chosen_tau"] == 0.003
  stored = compare.utils.read_json(str(tmp_path / "tau_sweep.json"))
  assert set(stored["validation_mean_ndcg@10"]) == {"0.001", "0.003", "0.01"}
  calls.clear()
  # Another validation sample size: nothing is reused.
  monkeypatch.setattr(flag, "value", 0)
  again = compare._select_tau(cfg, str(tmp_path), ["0.003", "0.03"])
  assert calls == [(0.003, None), (0.03, None)] and again["chosen_tau"] == 0.03
  assert again["validation_examples_per_task"] == "all"
