r"""Runs the stages of a sigma_jax experiment over one work directory.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/sigma_demo
  python -m launch.train --config=configs/beauty.py --workdir=runs/beauty \
      --config.stages=data,collab --config.collab.epochs=20

Every config field can be overridden as ``--config.section.field=value``. A finished stage is
skipped on the next run; an interrupted one resumes from its last checkpoint.
"""
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all artifacts.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS log every checkpoint and file operation through absl at INFO; keep their
  # warnings, drop the chatter, so the progress bars and stage messages stay readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  from sigma_jax import pipeline  # after flags, so JAX starts with the user's environment
  summaries = pipeline.run(_CONFIG.value, _WORKDIR.value)
  json.dump(summaries, sys.stdout, indent=2, sort_keys=True)
  print()


if __name__ == "__main__":
  app.run(main)
