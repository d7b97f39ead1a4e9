"""The comparison (sigma_jax/eval/compare.py, CLI launch/compare.py): the numbers in the Markdown
are the JSON's, per task and averaged; τ is chosen through the one cached sweep; each row's config
is its config variant (configs/base.py)."""
import os

import pytest

from conftest import ROOT
from sigma_jax import utils
from sigma_jax.eval import compare


def _m(hr10, ndcg10, n, **extra):
  return dict({"hr@1": hr10 / 4, "hr@5": hr10 / 2, "hr@10": hr10, "hr@20": hr10 * 1.5,
               "ndcg@5": ndcg10 / 2, "ndcg@10": ndcg10, "ndcg@20": ndcg10 * 1.25,
               "num_examples": n}, **extra)


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
  md = compare.markdown("demo", _rows(), per_task=True)
  summary = {r[0]: r[1:] for r in _table(md, "Mean over the 2 tasks")}
  # collab has no instruction tasks, so it has no mean; the others average the two tasks.
  assert set(summary) == {"sigma", "gr_id"}
  assert summary["sigma"] == ["0.6000", "0.4250", "0.3500"]
  assert summary["gr_id"] == ["0.4000", "0.2750", "0.1750"]
  jfy = {r[0]: r[1:] for r in _table(md, "## justforyou (50 test examples)")}
  assert set(jfy) == {"collab", "sigma", "gr_id"}  # SASRec is a next-item model: JustForYou
  # HR@{1,5,10,20}, NDCG@{5,10,20}; collab's test dict here has no NDCG@5/@20: shown missing.
  assert jfy["collab"] == ["0.0100", "0.0500", "0.2000", "0.3000", "—", "0.1100", "—"]
  assert jfy["sigma"][:7] == ["0.0750", "0.1500", "0.3000", "0.4500", "0.0750", "0.1500",
                              "0.1875"]
  query = {r[0]: r[1:] for r in _table(md, "## query (40 test examples)")}
  assert set(query) == {"sigma", "gr_id"}
  assert query["sigma"][-1] == "1.0000"
  assert query["gr_id"][-1] == "—"  # a metric a row lacks is shown as missing, not as 0


def test_single_task_table():
  rows = {"collab": {"test": {"recall@5": .01, "ndcg@5": .02, "recall@10": .03, "ndcg@10": .04}},
          "sigma": {"test": {"recall@5": .05, "ndcg@5": .06, "recall@10": .07, "ndcg@10": .08}}}
  md = compare.markdown("beauty", rows, per_task=False)
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
  out = compare.paired(str(tmp_path), rows)
  # No ranks.npz: listed, not silently dropped (collab's come from compare.collab_ranks).
  assert out["missing"] == ["collab", "gr_sid"]
  assert set(out["rows"]) == {"gr_id"} and set(out["rows"]["gr_id"]) == {"justforyou", "query"}
  jfy = out["rows"]["gr_id"]["justforyou"]
  hit = (sigma_jfy >= 0) & (sigma_jfy < 10)
  want = np.where(hit, 1 / np.log2(np.maximum(sigma_jfy, 0) + 2), 0).mean()
  assert np.isclose(jfy["diff"], want) and jfy["ci95_low"] > 0
  assert out["rows"]["gr_id"]["query"]["diff"] == 0.0
  md = compare.paired_markdown(out)
  line = next(x for x in md.splitlines() if x.startswith("| gr_id"))
  assert f"+{want:.4f}*" in line  # significant: starred
  assert "+0.0000 [+0.0000, +0.0000]" in line  # identical: no star
  assert "No per-example ranks for: collab, gr_sid" in md


def test_selection_table_marks_the_chosen_tau():
  sweeps = {"collab": {"validation": {}, "test": {}},  # not a sweep: left out
            "sigma": {"validation_mean_ndcg@10": {"0.001": .031, "0.003": .029},
                      "chosen_tau": 0.001, "validation_examples_per_task": 3000},
            "sigma_no_apf": {"reuses_sft_of": "sigma"}}
  lines = compare.selection_markdown(sweeps).splitlines()
  assert lines[2:] == ["| sigma | 0.001 (chosen) | 0.0310 | 3000 |",
                       "| sigma | 0.003 | 0.0290 | 3000 |"]


def test_tau_sweep_cache_follows_the_grid(tmp_path, monkeypatch):
  """A re-run with a wider grid evaluates only the new τ values and chooses among the grid it
  was given; a cache made on another number of validation examples is not reused."""
  from configs import demo
  from sigma_jax.eval import evaluate, tau

  score = {0.001: .02, 0.003: .03, 0.01: .025, 0.03: .04}
  calls, loads = [], []

  def fake_evaluate(cfg, generator, taus, limit, tasks):
    calls.extend((t, limit) for t in taus)
    return {tau.key(t): {"justforyou": {"ndcg@10": score[t]},
                         "query": {"ndcg@10": score[t] / 2}} for t in taus}

  monkeypatch.setattr(evaluate, "load_generator",
                      lambda cfg, rdir: loads.append(rdir) or (None, None, 0))
  monkeypatch.setattr(tau, "_evaluate", fake_evaluate)
  cfg = demo.get_config()
  cfg.generation.eval_tasks = "justforyou,query"

  first = compare.select_tau(cfg, str(tmp_path), ["0.001", "0.003"], tau_limit=100)
  assert first["chosen_tau"] == 0.003 and calls == [(0.001, 100), (0.003, 100)]
  assert first["validation_mean_ndcg@10"] == {"0.001": .015, "0.003": .0225}
  assert first["validation_examples_per_task"] == 100
  calls.clear()
  loads.clear()
  # A narrower grid is answered from the cache (no model loaded) and chooses among its own
  # values only.
  narrow = compare.select_tau(cfg, str(tmp_path), ["0.001"], tau_limit=100)
  assert calls == [] and loads == [] and narrow["chosen_tau"] == 0.001
  assert narrow["validation_mean_ndcg@10"] == {"0.001": .015}
  # A wider grid evaluates only what the cache lacks.
  wide = compare.select_tau(cfg, str(tmp_path), ["0.001", "0.003", "0.01"], tau_limit=100)
  assert calls == [(0.01, 100)] and wide["chosen_tau"] == 0.003
  stored = utils.read_json(str(tmp_path / tau.CACHE))
  (entry,) = stored["sweeps"]
  assert set(entry["metrics"]) == {"0.001", "0.003", "0.01"}  # every τ evaluated is kept
  calls.clear()
  # Another validation sample size: nothing is reused.
  again = compare.select_tau(cfg, str(tmp_path), ["0.003", "0.03"])
  assert calls == [(0.003, None), (0.03, None)] and again["chosen_tau"] == 0.03
  assert again["validation_examples_per_task"] == "all"
  # The other decoding settings key the cache as well: more beams are another sweep.
  calls.clear()
  cfg.generation.num_beams = 32
  compare.select_tau(cfg, str(tmp_path), ["0.003"])
  assert calls == [(0.003, None)]
  assert len(utils.read_json(str(tmp_path / tau.CACHE))["sweeps"]) == 3
  # So does a fixed σ (an adaptive sweep's settings have no such key: older caches still match).
  calls.clear()
  cfg.generation.apf_fixed_sigma = 1.0
  compare.select_tau(cfg, str(tmp_path), ["0.003"])
  assert calls == [(0.003, None)]
  sweeps = utils.read_json(str(tmp_path / tau.CACHE))["sweeps"]
  assert [e["settings"].get("apf_fixed_sigma") for e in sweeps] == [None, None, None, 1.0]
  # A seeded random sample of validation examples is another sweep, keyed by its seed; with no
  # limit there is nothing to sample and the key stays that of "all".
  calls.clear()
  cfg.generation.eval_sample = "random"
  compare.select_tau(cfg, str(tmp_path), ["0.003"])
  assert calls == []
  for seed in (0, 1):
    cfg.generation.eval_sample_seed = seed
    compare.select_tau(cfg, str(tmp_path), ["0.003"], tau_limit=100)
  assert calls == [(0.003, 100), (0.003, 100)]
  sweeps = utils.read_json(str(tmp_path / tau.CACHE))["sweeps"]
  assert [e["settings"].get("sample_seed") for e in sweeps][-2:] == [0, 1]


def test_fixed_sigma_row_sweeps_its_own_grid(tmp_path, monkeypatch):
  """sigma_fixed_fusion reuses sigma's SFT and chooses its constant σ/τ on validation from the
  fixed-σ grid; an adaptive row sweeps --taus."""
  from configs import base, demo
  from sigma_jax import experiment

  grids = []

  def fake_select(cfg, rdir, taus, tau_limit=0):
    grids.append((os.path.basename(rdir), float(cfg.generation.apf_fixed_sigma), list(taus)))
    return {"chosen_tau": float(taus[-1]), "validation_mean_ndcg@10": {}}

  monkeypatch.setattr(compare, "select_tau", fake_select)
  monkeypatch.setattr(experiment.pipeline, "run", lambda *a, **k: None)
  cfg = demo.get_config()
  res = experiment.run_row(cfg, str(tmp_path), "sigma_fixed_fusion", ["0.01"], base.apply_variant,
                           select_only=True, fixed_taus=["0.1", "0.3"])
  assert grids == [("sigma_fixed_fusion", 1.0, ["0.1", "0.3"])]
  assert res["tau"]["chosen_tau"] == 0.3 and res["tau"]["apf_fixed_sigma"] == 1.0
  assert abs(res["tau"]["sigma_over_tau"] - 1 / 0.3) < 1e-9
  assert res["tau"]["reuses_sft_of"] == "sigma"
  assert os.path.islink(os.path.join(compare.row_dir(str(tmp_path), "sigma_fixed_fusion"), "sft"))
  experiment.run_row(cfg, str(tmp_path), "sigma", ["0.01"], base.apply_variant,
                     select_only=True, fixed_taus=["0.1", "0.3"])
  assert grids[-1] == ("sigma", 0.0, ["0.01"])


def test_plots_and_diagnostics_read_the_same_sweep(tmp_path, monkeypatch):
  """plots.apf_sweep and diagnostics.decoding are views of tau.sweep: with its cache filled
  they evaluate nothing."""
  from configs import demo
  from sigma_jax import plots
  from sigma_jax.eval import diagnostics, tau

  metrics = {"hr@10": .5, "ndcg@10": .25, "category_coverage@10": .75, "num_examples": 7}
  calls = []

  def fake_evaluate(cfg, generator, taus, limit, tasks):
    calls.extend(taus)
    return {tau.key(t): {"justforyou": dict(metrics), "longtail": dict(metrics)} for t in taus}

  monkeypatch.setattr(tau, "_evaluate", fake_evaluate)
  cfg = demo.get_config()
  sw = plots.apf_sweep(cfg, str(tmp_path), (0.01, 0.1), limit=64, generator=(None, None, 0))
  assert calls == [0.01, 0.1] and sw["taus"] == [0.01, 0.1]
  assert sw["tasks"]["longtail"] == {"hr@10": [.5, .5], "category_coverage@10": [.75, .75],
                                     "num_examples": 7}
  assert utils.read_json(str(tmp_path / "plots" / "apf_tradeoff.json"))["tasks"] == sw["tasks"]
  calls.clear()
  plots.apf_sweep(cfg, str(tmp_path), (0.1,), limit=64)  # cached: no generator needed
  assert calls == []
  lines = diagnostics.decoding(cfg, str(tmp_path), [cfg.generation.num_beams],
                               [cfg.generation.top_m], ["0.1"], 64)
  assert calls == [] and lines[2] == f"| {cfg.generation.num_beams} | " \
      f"{cfg.generation.top_m} | 0.0 | 0.1 | 0.2500 | 0.5000 |"
  # Another popularity-prior weight is another sweep: evaluated, then cached under its own key.
  from sigma_jax.eval import evaluate
  monkeypatch.setattr(evaluate, "load_generator", lambda cfg, workdir: (None, None, 0))
  lines = diagnostics.decoding(cfg, str(tmp_path), [cfg.generation.num_beams],
                               [cfg.generation.top_m], ["0.1"], 64, item_priors=["0.05"])
  assert calls == [0.1] and "| 0.05 | 0.1 |" in lines[2]
  diagnostics.decoding(cfg, str(tmp_path), [cfg.generation.num_beams],
                       [cfg.generation.top_m], ["0.1"], 64, item_priors=["0.05"])
  assert calls == [0.1]


def test_rows_are_config_variants():
  """Each row changes exactly the fields of its variant in configs/base.py, and compare builds
  a row's config from that variant alone."""
  from configs import base, beauty, demo, movielens, scientific

  def flat(c):
    out = {}
    for k, v in c.items():
      if hasattr(v, "items"):
        out.update({f"{k}.{kk}": vv for kk, vv in flat(v).items()})
      else:
        out[k] = v
    return out

  want = {"sigma": {},
          "gr_sid": {"generation.mode": "gr_sid", "sft.max_len": 192, "sft.mu": 0.0},
          "gr_id": {"generation.mode": "gr_id"},
          "sigma_no_grounding": {"tokenizer.source": "raw", "sft.text_features": "raw",
                                 "sft.init": "scratch"},
          "sigma_no_apf": {"generation.fuse": False},
          "sigma_fixed_fusion": {"generation.apf_fixed_sigma": 1.0},
          "sigma_soft": {"generation.constraints": "soft"},
          "sigma_no_instruction": {"generation.constraints": "soft",
                                   "generation.instruction": "none"},
          "popular": {},
          "popular_soft": {"generation.constraints": "soft"}}
  assert base.ROW_VARIANTS == want
  assert set(compare.MODEL_ROWS) == set(want) - set(compare.POPULAR_ROWS)
  assert set(compare.ROWS) == set(want) | {"collab"}
  for module in (beauty, scientific, movielens, demo):
    ref = flat(module.get_config())
    for row, changes in want.items():
      got = flat(module.get_config(row))
      diff = {k: got[k] for k in got if got[k] != ref[k]}
      assert diff == changes, (module.__name__, row)
      if row in compare.POPULAR_ROWS:  # no model: experiment.run applies the variant itself
        continue
      # compare's row config: the variant applied to the given config, nothing else (a soft
      # row also evaluates only the tasks whose constraint it relaxes).
      viaconf = flat(compare.row_config(module.get_config(), row, base.apply_variant))
      assert viaconf == flat(compare.relaxed_tasks(module.get_config(row))), (module.__name__,
                                                                              row)
  c = beauty.get_config("gr_sid")
  assert c.generation.mode == "gr_sid" and c.sft.max_len == 192 and c.sft.mu == 0.0
  # Variants combine, comma-separated, in order.
  c = beauty.get_config("tiny,gr_sid")
  assert c.model.size == "tiny" and c.generation.mode == "gr_sid"
  assert flat(beauty.get_config("tiny")) == flat(base.make_tiny(beauty.get_config()))
  assert flat(demo.get_config("tiny")) == flat(demo.get_config())
  assert flat(beauty.get_config("")) == flat(beauty.get_config())
  with pytest.raises(ValueError, match="unknown config variant.*'gr_sdi'.*gr_sid"):
    beauty.get_config("tiny,gr_sdi")
  with pytest.raises(ValueError, match="'collab' is not a generative row"):
    compare.row_config(beauty.get_config(), "collab", base.apply_variant)


def test_apf_tau_matches_the_documented_choice():
  """The configs carry the τ their docstrings and docs/RESULTS.md report as chosen."""
  from configs import beauty, movielens, scientific

  for module in (beauty, scientific, movielens):
    assert module.get_config().generation.apf_tau == 0.003, module.__name__


def test_launch_compare_rows_come_from_the_configs(tmp_path, monkeypatch):
  """launch.compare hands the library configs/base.py's variants and its flags, and writes
  <dataset>.json and .md under --out; without --out under WORKDIR/results, never over the
  committed docs/results."""
  from absl import flags

  from configs import base, demo
  from launch import compare as cli

  seen = {}

  def fake_run(cfg, workdir, rows, taus, *, configure, tau_limit, select_only, command,
               fixed_taus):
    seen.update(workdir=workdir, rows=rows, taus=taus, configure=configure,
                tau_limit=tau_limit, select_only=select_only, command=command,
                fixed_taus=fixed_taus)
    m = {"hr@1": .1, "hr@5": .2, "hr@10": .3, "hr@20": .4, "ndcg@10": .25}
    return {"rows": {"sigma": {split: {"justforyou": m} for split in ("validation", "test")}},
            "paired_vs_sigma": {"rows": {}, "missing": []}}

  monkeypatch.setattr(cli.experiment, "run", fake_run)

  def run_cli(*extra):
    argv = ["compare", "--config=configs/demo.py", f"--workdir={tmp_path}/w", "--rows=sigma",
            "--taus=0.01", "--tau_limit=5", *extra]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
      cli.main([argv[0]])
    finally:
      flags.FLAGS.unparse_flags()

  committed = os.path.join(ROOT, "docs", "results", "demo.json")
  before = os.path.getmtime(committed) if os.path.exists(committed) else None
  run_cli(f"--out={tmp_path}/out")
  assert seen["configure"] is base.apply_variant
  assert seen["rows"] == ["sigma"] and seen["taus"] == ["0.01"] and seen["tau_limit"] == 5
  assert seen["fixed_taus"] == list(compare.FIXED_SIGMA_TAUS)
  assert seen["command"].startswith("python -m launch.compare ")
  assert utils.read_json(str(tmp_path / "out" / "demo.json"))["rows"]["sigma"]
  assert "| sigma |" in (tmp_path / "out" / "demo.md").read_text()
  assert demo.get_config().dataset.name == "demo"
  run_cli()  # no --out: the work directory's results/, not docs/results
  assert utils.read_json(str(tmp_path / "w" / "results" / "demo.json"))["rows"]["sigma"]
  assert (os.path.getmtime(committed) if os.path.exists(committed) else None) == before

  # Without --out an existing table is never replaced (the rows do not even run) ...
  seen.clear()
  with pytest.raises(SystemExit, match=r"results/demo\.json already exists .* --overwrite"):
    run_cli()
  assert not seen
  # ... unless --overwrite or an explicit --out says so.
  run_cli("--overwrite")
  assert seen["rows"] == ["sigma"]
  run_cli(f"--out={tmp_path}/out")


def test_write_refuses_to_overwrite(tmp_path):
  """compare.write with overwrite=False leaves an existing table as it is."""
  from configs import demo

  cfg = demo.get_config()
  (tmp_path / "demo.json").write_text("{}")
  result = {"rows": {}, "paired_vs_sigma": {"rows": {}, "missing": []}}
  with pytest.raises(FileExistsError, match="demo.json already exists"):
    compare.write(cfg, result, str(tmp_path), overwrite=False)
  assert (tmp_path / "demo.json").read_text() == "{}"


def test_all_items_rows_rank_the_same_model_under_tigers_protocol(tmp_path, monkeypatch):
  """sigma@all_items reuses sigma's trained stages, chooses its own τ on validation with history
  items ranked (dataset.exclude_history off) and evaluates in a directory of its own; the row
  names are checked before any work."""
  from configs import base, demo
  from sigma_jax import experiment

  runs, sweeps = [], []

  def fake_pipeline(cfg, rdir, strict=False):
    runs.append((os.path.basename(rdir), cfg.stages, bool(cfg.dataset.exclude_history)))
    os.makedirs(os.path.join(rdir, cfg.stages), exist_ok=True)  # the stage's directory
    if cfg.stages == "eval":
      utils.write_json(os.path.join(rdir, "eval", "metrics.json"), {"tasks": {}})

  def fake_select(cfg, rdir, taus, tau_limit=0):
    sweeps.append((os.path.basename(rdir), bool(cfg.dataset.exclude_history)))
    return {"chosen_tau": float(taus[0]), "validation_mean_ndcg@10": {}}

  monkeypatch.setattr(experiment.pipeline, "run", fake_pipeline)
  monkeypatch.setattr(compare, "select_tau", fake_select)
  cfg = demo.get_config()
  assert cfg.dataset.exclude_history  # the demo's own protocol filters history items
  w = str(tmp_path)
  res = experiment.run_row(cfg, w, "sigma@all_items", ["0.01"], base.apply_variant)
  # sigma's SFT trained under its own directory; τ and eval under TIGER's protocol in another.
  assert runs == [("sigma", "sft", True), ("sigma@all_items", "eval", False)]
  assert sweeps == [("sigma@all_items", False)]
  assert res["tau"]["reuses_sft_of"] == "sigma"
  link = os.path.join(compare.row_dir(w, "sigma@all_items"), "sft")
  assert os.path.realpath(link) == os.path.realpath(os.path.join(compare.row_dir(w, "sigma"),
                                                                 "sft"))
  assert cfg.dataset.exclude_history  # the caller's config is untouched

  assert compare.ordered_rows(["sigma@all_items", "collab", "sigma", "collab@all_items"]) == [
      "collab", "collab@all_items", "sigma", "sigma@all_items"]
  for bad in ("sigma@all", "sasrec", "sigma@all_items@all_items"):
    with pytest.raises(ValueError, match="unknown row"):
      compare.ordered_rows([bad])


def test_all_items_rows_pair_with_sigma_at_all_items(tmp_path):
  import numpy as np

  for row, ranks in (("sigma", [0, 0, 0]), ("gr_id", [5, 5, 5]),
                     ("sigma@all_items", [3, 3, 3]), ("gr_id@all_items", [3, 3, 3])):
    d = tmp_path / "rows" / row / "eval"
    os.makedirs(d)
    np.savez(d / "ranks.npz", **{"justforyou/test": np.array(ranks)})
  rows = {r: {} for r in ("collab", "sigma", "gr_id", "collab@all_items", "sigma@all_items",
                          "gr_id@all_items")}
  out = compare.paired(str(tmp_path), rows)
  assert set(out["rows"]) == {"gr_id", "gr_id@all_items"}
  assert out["missing"] == ["collab", "collab@all_items"]
  assert out["rows"]["gr_id"]["justforyou"]["diff"] > 0  # against sigma
  assert out["rows"]["gr_id@all_items"]["justforyou"]["diff"] == 0.0  # against sigma@all_items
  assert "sigma@all_items" in compare.paired_markdown(out).splitlines()[0]


def test_tables_are_per_task_when_more_than_justforyou_is_evaluated():
  """An Amazon next-item comparison reports JustForYou alone; its `:multitask` variant and
  MovieLens report every task."""
  from configs import beauty, movielens

  assert not compare.is_per_task(beauty.get_config())
  assert compare.is_per_task(beauty.get_config("multitask"))
  c = beauty.get_config()
  c.generation.eval_tasks = "category,query"
  assert compare.is_per_task(c)
  assert compare.is_per_task(movielens.get_config())


def test_multitask_variant_changes_only_the_task_lists():
  """`:multitask` trains and evaluates every task the data allow, with room for Category's
  longer prompts; nothing else changes."""
  from configs import beauty, scientific

  # Scientific's Category instructions are longer (up to 41 tokens; configs/scientific.py).
  for module, max_len in ((beauty, 144), (scientific, 160)):
    one, many = module.get_config().to_dict(), module.get_config("multitask").to_dict()
    assert one["sft"]["tasks"] == one["generation"]["eval_tasks"] == "justforyou"
    assert many["sft"]["tasks"] == many["generation"]["eval_tasks"] == ""
    assert (one["sft"]["max_len"], many["sft"]["max_len"]) == (128, max_len)
    many["sft"]["tasks"] = many["generation"]["eval_tasks"] = "justforyou"
    many["sft"]["max_len"] = 128
    assert many == one
  # It combines with a row: the multi-task gr_id.
  c = beauty.get_config("multitask,gr_id")
  assert c.sft.tasks == "" and c.generation.mode == "gr_id"
  assert scientific.get_config("multitask,gr_sid").sft.max_len == 192  # gr_sid's own


def test_paired_runs_pairs_two_work_directories(tmp_path, monkeypatch):
  """compare.paired_runs (launch.paired): two rows of different runs on the same data pair
  task by task; different data, or a row never evaluated, is an error naming it."""
  import numpy as np

  from sigma_jax import workdir as wd

  def row(name, data, **ranks):
    d = tmp_path / name
    os.makedirs(d / "eval")
    os.makedirs(d / "data")
    np.savez(d / "eval" / "ranks.npz", **ranks)
    utils.write_json(wd.recipe_path(str(d), "data"), data)
    return str(d)

  data = {"dataset.name": "beauty", "seed": 0}
  n = 200
  multi = row("multi", data, **{"justforyou/test": np.zeros(n, int),
                                "category/test": np.zeros(50, int)})
  single = row("single", data, **{"justforyou/test": np.full(n, -1),
                                  "justforyou/validation": np.zeros(10, int)})
  out = compare.paired_runs(multi, single)
  assert set(out["tasks"]) == {"justforyou"}  # the only task both evaluated
  assert out["tasks"]["justforyou"]["diff"] == 1.0 and out["tasks"]["justforyou"]["ci95_low"] > 0
  assert out["tasks"]["justforyou"]["num_examples"] == n
  assert "| justforyou | +1.0000* [+1.0000, +1.0000] | 200 |" in compare.paired_runs_markdown(out)

  other = row("other", dict(data, seed=1), **{"justforyou/test": np.zeros(n, int)})
  with pytest.raises(ValueError, match="different data .*seed"):
    compare.paired_runs(multi, other)
  short = row("short", data, **{"justforyou/test": np.zeros(n - 1, int)})
  with pytest.raises(ValueError, match="share no task"):
    compare.paired_runs(multi, short)
  os.makedirs(tmp_path / "untrained")
  with pytest.raises(FileNotFoundError, match="untrained.*not been evaluated"):
    compare.paired_runs(multi, str(tmp_path / "untrained"))
