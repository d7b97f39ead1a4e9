"""eval.diagnostics (launch/diagnose.py): SASRec scored by its dot product reproduces the collab stage's own metrics,
so the cosine rows beside them differ only in the scoring."""
from configs import demo
from sigma_jax.data import loader
from sigma_jax.eval import diagnostics
from sigma_jax.train import collab


def test_collab_cosine_dot_rows_match_the_collab_metrics(demo_workdir):
  cfg = demo.get_config()
  lines = diagnostics.collab_cosine(cfg, demo_workdir, ["validation", "test"])
  rows = {(c[0], c[1]): [float(x) for x in c[2:]] for c in
          ([p.strip() for p in line.strip("|").split("|")] for line in lines[2:])}
  assert set(rows) == {(s, sp) for s in ("dot (as trained)", "cosine")
                       for sp in ("validation", "test")}
  want = collab.rescore(cfg, loader.load_dataset(cfg, demo_workdir).splits, demo_workdir)
  for split in ("validation", "test"):
    m = want[split]
    expect = [m["recall@5"], m["ndcg@5"], m["recall@10"], m["ndcg@10"]]
    assert rows[("dot (as trained)", split)] == [round(x, 4) for x in expect]
