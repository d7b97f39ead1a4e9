"""The trained demo model has learned something: it beats the `popular` row on validation.

Plumbing alone (a model that ignores the history, a ranking by item index, a broken <q> head)
scores at or below the most popular items, so this test fails unless training worked.
"""
import pytest

from configs import demo as demo_config
from sigma_jax.eval import evaluate, popular

# The demo model does NOT beat `popular` yet (measured 2026-12-04, 2 shared CPU cores, validation
# JustForYou, all 300 users):
#   conftest's FAST_DEMO run as it was then (collab 2 epochs, ground 40 steps, 1 SFT epoch =
#   147 steps; it now runs 60 SFT steps):
#     sigma NDCG@10 .0155, HR@10 .0267; popular NDCG@10 .0389, HR@10 .0700;
#   the same shared stages plus a JustForYou-only SFT of 300 steps (warmup 20; 132 s):
#     sigma NDCG@10 .0030;
#   the full default demo config (configs/demo.py: collab 3 epochs, ground 200 steps, SFT 2
#   epochs = 294 steps, ~5 min for SFT alone): sigma NDCG@10 .0190, HR@10 .0267; its SASRec
#   (collab) validation NDCG@10 .0021. No model trained at demo size gets near popularity.
# The test is therefore a strict expected failure: it keeps the real bar (not lowered to what
# the demo reaches), and it errors (XPASS) once the demo model clears it, so the mark has to be
# removed then. The thresholds (1.5x popular and +.02 NDCG@10) were not calibrated on a run that
# passes; revisit them with the first one that does.
pytestmark = pytest.mark.slow
_BELOW_POPULAR = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="the demo sigma is below popular on validation (NDCG@10 .0155 vs .0389); see above")


@pytest.fixture(scope="module")
def scored(demo_workdir):
  """Validation JustForYou metrics of the demo sigma and of `popular`, on every example."""
  cfg = demo_config.get_config()
  cfg.progress = False
  ds, gen, _ = evaluate.load_generator(cfg, demo_workdir)
  out = {}
  for name, ranker in (("sigma", gen), ("popular", popular.PopularRanker(cfg, ds))):
    out[name] = evaluate.evaluate(cfg, ds, ranker, splits=("validation",),
                                  task_names=["justforyou"], progress=False)
  return {k: v["justforyou"]["validation"] for k, v in out.items()}


def test_both_rows_scored_on_the_same_examples(scored):
  sigma, pop = scored["sigma"], scored["popular"]
  assert sigma["num_examples"] == pop["num_examples"] == 300  # every demo user
  assert sigma["invalid_share"] == pop["invalid_share"] == 0.0
  assert 0.0 < pop["ndcg@10"] < 1.0


@_BELOW_POPULAR
def test_sigma_beats_popular_on_validation(scored):
  sigma, pop = scored["sigma"], scored["popular"]
  # A clear margin, relative and absolute (popular's NDCG@10 is .0389 on the demo).
  assert sigma["ndcg@10"] >= 1.5 * pop["ndcg@10"], (sigma, pop)
  assert sigma["ndcg@10"] - pop["ndcg@10"] >= 0.02, (sigma, pop)
  assert sigma["hr@10"] > pop["hr@10"], (sigma, pop)
