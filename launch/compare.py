r"""Runs one dataset's comparison and writes its results table (Markdown and JSON).

  python -m launch.compare --config=configs/beauty.py --workdir=runs/beauty
  python -m launch.compare --config=configs/movielens.py --workdir=runs/movielens

Rows: `popular` (the most popular training items: no model, needs the data stage only;
`--rows=popular` runs nothing else), `collab` (SASRec), `gr_sid` (TIGER-style full SID), `gr_id`,
`sigma`, and the ablations `sigma_no_grounding` (SIDs from un-grounded TF-IDF text embeddings),
`sigma_no_apf` (sigma's model ranked without APF) and `sigma_fixed_fusion` (sigma's model, APF
with one constant σ for every query; the constant σ/τ chosen on validation from
`--fixed_sigma_taus`). Each generative row's config is --config with the row's variant applied
(configs/base.py: ROW_VARIANTS; `--config=configs/beauty.py:gr_sid` is that row's config on its
own). The shared stages (data, text_tokenizer, collab, ground, tokenize) run once
in WORKDIR; each row's own stages run in WORKDIR/rows/<row>, which links the shared ones.
APF's τ is chosen per row on the validation split (`--taus`); test is evaluated once, with the
chosen τ. Writes WORKDIR/results/<dataset>.json and .md (--out=docs/results updates the
committed tables). Without --out, existing tables there are never replaced unless --overwrite
says so: the command stops before any work. Resumable like launch.train: finished stages and
rows are skipped. The work is sigma_jax/experiment.py's (running rows) and
sigma_jax/eval/compare.py's (tables).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from sigma_jax import experiment
from sigma_jax.eval import compare

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the comparison.")
_ROWS = flags.DEFINE_list("rows", list(compare.ROWS), "Rows to run; '<row>@all_items' is the "
                          "row's model ranked under TIGER's protocol (history items ranked too, "
                          "τ chosen on validation under it), e.g. sigma@all_items.")
_TAUS = flags.DEFINE_list("taus", list(compare.DEFAULT_TAUS),
                          "APF temperatures tried on validation.")
_FIXED_TAUS = flags.DEFINE_list(
    "fixed_sigma_taus", list(compare.FIXED_SIGMA_TAUS), "APF temperatures tried on validation "
    "for a row with a fixed σ (sigma_fixed_fusion, σ = 1: the grid of the constant 1/τ).")
_TAU_LIMIT = flags.DEFINE_integer("tau_limit", 0, "Validation examples per task used to choose "
                                  "τ (0: all); test always uses every example.")
_OUT = flags.DEFINE_string(
    "out", "", "Directory for <dataset>.json and .md; default WORKDIR/results, so a run never "
    "overwrites the committed docs/results unless --out=docs/results says so. An explicit --out "
    "replaces the tables there.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Without --out: replace existing tables in WORKDIR/results (by default "
    "an existing table stops the command before any work).")
_SELECT_ONLY = flags.DEFINE_bool(
    "select_only", False, "Validation only: train each row and run its τ sweep, print the "
    "validation table, and evaluate nothing on test (for choosing hyper-parameters).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import logging as pylogging
  pylogging.getLogger().setLevel(pylogging.INFO)
  cfg = _CONFIG.value
  out_dir = _OUT.value or os.path.join(_WORKDIR.value, "results")
  overwrite = bool(_OUT.value) or _OVERWRITE.value
  if not _SELECT_ONLY.value:
    try:
      compare.check_overwrite(cfg, out_dir, overwrite)  # before hours of work, not after
    except FileExistsError as e:
      sys.exit(f"launch.compare: {e}")
  result = experiment.run(cfg, _WORKDIR.value, _ROWS.value, _TAUS.value,
                       configure=base.apply_variant, tau_limit=_TAU_LIMIT.value,
                       select_only=_SELECT_ONLY.value, fixed_taus=_FIXED_TAUS.value,
                       command="python -m launch.compare " + " ".join(sys.argv[1:]))
  if _SELECT_ONLY.value:
    print(compare.selection_markdown(result))
    return
  try:
    print(compare.write(cfg, result, out_dir, overwrite=overwrite))
  except FileExistsError as e:
    sys.exit(f"launch.compare: {e}")


if __name__ == "__main__":
  app.run(main)
