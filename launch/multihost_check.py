r"""Multi-host smoke test: a few SFT steps and the generator on the global mesh of every process.

Run it the same way on one process or on many (one per host); it writes what was computed, so
a multi-process run can be compared with a single-process run of the same global batches:

  python -m launch.multihost_check --config=configs/demo.py --workdir=DIR --out=/tmp/one.npz
  # on each of P hosts (or P local processes):
  python -m launch.multihost_check --config=configs/demo.py --workdir=DIR --out=/tmp/many.npz \
      --coordinator_address=HOST0:PORT --num_processes=P --process_id=I

DIR needs a finished ``tokenize`` stage (the SFT inputs), e.g. from ``launch.train``. Process 0
writes OUT (npz: ``losses`` [S], ``params`` flattened float32, ``items`` [U, N]) and prints one
JSON line. Every process checks that all processes returned the same recommendations.
"""
import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory with a finished tokenize stage.")
_OUT = flags.DEFINE_string("out", None, "Where process 0 writes the results (.npz).")
_STEPS = flags.DEFINE_integer("steps", 3, "SFT steps to run.")
_USERS = flags.DEFINE_integer("users", 16, "Test users to recommend for.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start JAX's multi-process runtime (see launch.train).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100,
                                  "A peer silent this long stops the run with an error.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from sigma_jax import distributed
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value)
  import io

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from sigma_jax import parallel, utils
  from sigma_jax.data import loader
  from sigma_jax.generate import generator as gen_lib
  from sigma_jax.train import sft

  cfg, workdir = _CONFIG.value, _WORKDIR.value
  cfg.progress = False
  ds = loader.load_dataset(cfg, workdir)
  # The SFT stage's own setup (sigma_jax.train.sft.setup): the same loss, negatives and packing.
  run = sft.setup(cfg, workdir, parallel.make_mesh(cfg.mesh), ds=ds, total_steps=_STEPS.value)
  state, losses = run.state, []
  for step in range(_STEPS.value):
    state, m = run.step(state, run.host_batch(step))
    losses.append(float(m["loss"]))
    logging.warning("process %d step %d loss %.6f", distributed.process_index(), step + 1,
                    losses[-1])

  params = multihost_utils.process_allgather(state["params"], tiled=True)
  flat = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(params)])
  gen = gen_lib.Generator(cfg, run.assets, run.graphdef, state["params"])
  users = min(_USERS.value, len(ds.splits.test_hist))
  ranked = gen.recommend(ds.splits.test_hist[:users],
                         ["Recommend the next item for this user."] * users)
  items = np.asarray(ranked.items)
  distributed.agree(items, "recommendations")
  if distributed.is_primary():
    buf = io.BytesIO()
    np.savez(buf, losses=np.asarray(losses), params=flat, items=items)
    utils.write_bytes(_OUT.value, buf.getvalue())
    print(json.dumps({"processes": distributed.process_count(), "devices": jax.device_count(),
                      "losses": losses, "items_shape": list(items.shape)}))


if __name__ == "__main__":
  app.run(main)
