r"""Writes the figures of a work directory to WORKDIR/plots/ (see sigma_jax/plots.py).

  python -m launch.plots --workdir=/tmp/sigma_demo
  python -m launch.plots --workdir=runs/beauty --config=configs/beauty.py --taus=0.003,0.01,0.1

--config must be the config the work directory was trained with (default configs/demo.py); it
is used by the APF τ sweep, which runs the trained generator on the validation split.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEMO, "The experiment config the work directory was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A work directory.")
_TAUS = flags.DEFINE_list("taus", None,
                          "APF temperatures of the sweep (default: plots.DEFAULT_TAUS).")
_LIMIT = flags.DEFINE_integer("limit", 64, "Validation examples per task in the sweep; 0: all.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Run the APF τ sweep (needs a trained model).")
_FORCE = flags.DEFINE_bool("force", False, "Recompute the sweep even if cached.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint and dataset INFO logs would bury the answer; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  if not os.path.isdir(_WORKDIR.value):
    print(f"error: work directory {_WORKDIR.value} does not exist", file=sys.stderr)
    sys.exit(2)
  from sigma_jax import plots  # after flags, so JAX starts with the user's environment
  taus = tuple(float(t) for t in _TAUS.value) if _TAUS.value else plots.DEFAULT_TAUS
  limit = _LIMIT.value or None
  if _FORCE.value and _SWEEP.value:
    plots.apf_sweep(_CONFIG.value, _WORKDIR.value, taus, limit, force=True)
  paths = plots.make_all(_CONFIG.value, _WORKDIR.value, taus=taus, limit=limit,
                         sweep=_SWEEP.value)
  json.dump(paths, sys.stdout, indent=2, sort_keys=True)
  print()


if __name__ == "__main__":
  app.run(main)
