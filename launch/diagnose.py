r"""Validation diagnostics behind the choices in docs/RESULTS.md (nothing here touches test
unless asked with --splits).

  # How much of SASRec's ranking comes from its item norms: dot product vs cosine scores.
  python -m launch.diagnose --config=configs/beauty.py --workdir=runs/beauty --what=collab_cosine

  # A trained SIGMA model's validation NDCG@10 at other decoding settings (beams K, items per
  # prefix M, APF τ), on the first --limit validation examples.
  python -m launch.diagnose --config=configs/beauty.py --workdir=runs/beauty_v2/rows/sigma \
      --what=decoding --beams=20,64 --top_m=20 --taus=0.003 --limit=3000

Prints a Markdown table.
"""
from absl import app, flags
from ml_collections import config_flags

from sigma_jax.eval import diagnostics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (the row's, for decoding).")
_WHAT = flags.DEFINE_enum("what", None, ["collab_cosine", "decoding"], "Which diagnostic.")
_SPLITS = flags.DEFINE_list("splits", ["validation"], "Splits to report (collab_cosine).")
_BEAMS = flags.DEFINE_list("beams", ["20"], "Beam widths K (decoding).")
_TOP_M = flags.DEFINE_list("top_m", ["20"], "Items kept per prefix M (decoding).")
_TAUS = flags.DEFINE_list("taus", ["0.003"], "APF τ values (decoding).")
_PRIORS = flags.DEFINE_list("item_priors", None, "Popularity-prior weights λ "
                            "(generation.item_prior) to try (decoding); default: the config's.")
_LIMIT = flags.DEFINE_integer("limit", 3000, "Validation examples per task (decoding; 0: all).")
flags.mark_flags_as_required(["config", "workdir", "what"])


def main(argv):
  del argv
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  if _WHAT.value == "collab_cosine":
    lines = diagnostics.collab_cosine(cfg, workdir, _SPLITS.value)
  else:
    lines = diagnostics.decoding(cfg, workdir, _BEAMS.value, _TOP_M.value, _TAUS.value,
                                 _LIMIT.value, _PRIORS.value)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
