r"""Paired bootstrap between two evaluated rows of different runs, task by task.

  # The multi-task sigma minus the single-task one, on JustForYou test (the same users).
  python -m launch.paired --reference=runs/b24mt/rows/sigma --other=runs/b60d03/rows/sigma

`launch.compare` pairs the rows of one comparison against its sigma; this pairs two row
directories trained in different work directories (another recipe, another task mix), as long as
both were evaluated on the same data (their data stages share one recipe). Prints a Markdown
table of reference minus other, test NDCG@K per task, with its 95% interval; --out also writes
the JSON.
"""
import sys

from absl import app, flags

from sigma_jax import utils
from sigma_jax.eval import compare

_REFERENCE = flags.DEFINE_string("reference", None, "Evaluated row directory (the minuend).")
_OTHER = flags.DEFINE_string("other", None, "Evaluated row directory (the subtrahend).")
_K = flags.DEFINE_integer("k", 10, "NDCG cut-off.")
_SPLIT = flags.DEFINE_enum("split", "test", ["validation", "test"], "Split to pair.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON path for the result.")
flags.mark_flags_as_required(["reference", "other"])


def main(argv):
  del argv
  try:
    result = compare.paired_runs(_REFERENCE.value, _OTHER.value, _K.value, _SPLIT.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"launch.paired: {e}")
  if _OUT.value:
    utils.write_json(_OUT.value, result)
  print(compare.paired_runs_markdown(result))


if __name__ == "__main__":
  app.run(main)
