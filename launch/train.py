r"""Runs the stages of a sigma_jax experiment over one work directory.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/sigma_demo
  python -m launch.train --config=configs/beauty.py --workdir=runs/beauty \
      --config.stages=data,collab --config.collab.epochs=20

Every config field can be overridden as ``--config.section.field=value``. A finished stage is
skipped on the next run; an interrupted one resumes from its last checkpoint.

Multi-process (one process per host, same command everywhere, one shared --workdir): on a TPU
pod slice JAX finds its peers itself; elsewhere give each process

  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I

(or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID). See launch/tpu_pod.sh.
"""
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all artifacts.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start JAX's multi-process runtime: auto = when more than one "
                                 "process is configured or on a multi-host TPU slice.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (default $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (default $JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100,
                                  "A peer silent this long stops the run with an error.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS log every checkpoint and file operation through absl at INFO; keep their
  # warnings, drop the chatter, so the progress bars and stage messages stay readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Before any other JAX call: the multi-process runtime must start first.
  from sigma_jax import distributed
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value)
  cfg = _CONFIG.value
  if not distributed.is_primary():
    # Logs and progress bars come from process 0 only.
    logging.getLogger().setLevel(logging.WARNING)
    cfg.progress = False
  from sigma_jax import pipeline  # after flags, so JAX starts with the user's environment
  summaries = pipeline.run(cfg, _WORKDIR.value)
  if distributed.is_primary():
    json.dump(summaries, sys.stdout, indent=2, sort_keys=True)
    print()


if __name__ == "__main__":
  app.run(main)
