"""Kill -9 in the middle of every training stage, restart until done: the same bits at the end.

One FAST_DEMO run is SIGKILLed at seeded random points inside collab, ground and sft (after a
seeded random number of that stage's checkpoints, plus a seeded random delay), once with the
newest ground checkpoint garbled before the restart, and restarted until it finishes. Its final
artifacts must equal the uninterrupted run's (`demo_workdir`) bit for bit on CPU, and at every
kill the work directory must hold only complete artifacts.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from conftest import FAST_DEMO, ROOT, SUBPROCESS_XLA_FLAGS

# Checkpoint often enough that a kill lands after a mid-stage checkpoint. How often a stage saves
# does not change what it computes, so the result must still equal the reference run's.
CKPT_OVERRIDES = ("--config.ground.ckpt_every=10", "--config.sft.ckpt_every=10")
STAGE_ORDER = ("data", "text_tokenizer", "collab", "ground", "tokenize", "sft", "eval")
# Compared byte for byte with the uninterrupted run.
ARTIFACTS = ("collab/item_emb.npy", "collab/result.json", "ground/item_text_emb.npy",
             "ground/raw_text_emb.npy", "ground/report.json", "tokenize/sids.npy",
             "tokenize/buckets.npz", "tokenize/report.json", "sft/tasks.json",
             "eval/metrics.json")
SEED = 20260213


def _start(workdir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
  env["JAX_PLATFORMS"] = "cpu"
  # The session's compilation cache: restarts reuse the programs instead of recompiling. Kills
  # land during training steps, after compilation; a torn cache entry would only be a warning
  # and a recompile (JAX treats unreadable entries as misses).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SIGMA_TEST_JAX_CACHE"])
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/demo.py",
         f"--workdir={workdir}", *FAST_DEMO, *CKPT_OVERRIDES]
  log = open(os.path.join(os.path.dirname(workdir), f"log.{time.time_ns()}.txt"), "w+")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _steps(ckpt_dir):
  """Finished checkpoint steps (Orbax writes a step to a temporary name, then renames it)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _done(workdir, stage):
  return os.path.exists(os.path.join(workdir, stage, "DONE.json"))


def _kill_after_checkpoint(workdir, stage, min_step, delay, timeout=600):
  """Runs the pipeline; SIGKILLs it `delay` s after `stage` has saved step `min_step`.

  Returns (was the stage still unfinished when killed, the run's output).
  """
  proc, log = _start(workdir)
  ckpt_dir = os.path.join(workdir, stage, "ckpt")
  deadline = time.time() + timeout
  try:
    while max(_steps(ckpt_dir), default=-1) < min_step and not _done(workdir, stage):
      if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f"run ended before the kill point ({proc.returncode}):\n"
                             f"{log.read()[-4000:]}")
      assert time.time() < deadline, f"no checkpoint of {stage} after {timeout} s"
      time.sleep(0.05)
    time.sleep(delay)
    unfinished = not _done(workdir, stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  log.seek(0)
  return unfinished, log.read()


def _restart(workdir):
  proc, log = _start(workdir)
  proc.wait(timeout=900)
  log.seek(0)
  out = log.read()
  assert proc.returncode == 0, out[-4000:]
  return out


def _check_no_partial_artifacts(workdir):
  """Every artifact a killed run left is complete; temporaries never carry an artifact's name."""
  for stage in STAGE_ORDER:
    d = os.path.join(workdir, stage)
    if not os.path.isdir(d):
      continue
    for root, dirs, files in os.walk(d):
      dirs[:] = [x for x in dirs if x != "ckpt"]  # Orbax's own (tested via the fallback)
      for name in files:
        path = os.path.join(root, name)
        if name.endswith(".tmp") or ".tmp." in name:
          # utils.atomic_write's temporary: hidden, never read by a stage.
          assert name.startswith("."), f"temporary file under an artifact-like name: {path}"
          continue
        if name.endswith(".npy"):
          np.load(path)
        elif name.endswith(".npz"):
          with np.load(path) as z:
            for k in z.files:
              z[k]
        elif name.endswith(".json"):
          with open(path) as f:
            json.load(f)
        elif name.endswith(".model"):
          spm.SentencePieceProcessor(model_file=path)
        elif name.endswith(".jsonl"):
          # A log: only its last line may be torn by a kill, and stages drop it on resume.
          with open(path) as f:
            lines = f.read().split("\n")
          for line in lines[:-2]:
            json.loads(line)


def _garble_newest(ckpt_dir):
  step = _steps(ckpt_dir)[-1]
  for root, _, files in os.walk(os.path.join(ckpt_dir, str(step), "state")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(1, os.path.getsize(os.path.join(root, f)) // 3))
        fh.seek(0)
        fh.write(b"\x00garbled")
  return step


def _sft_params(workdir):
  import jax
  from configs import demo
  from sigma_jax import parallel
  from sigma_jax.train import sft
  cfg = demo.get_config()
  mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  assets = sft.load_assets(cfg, workdir)
  _, params, step = sft.load_params(cfg, workdir, assets, mesh)
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_identical(demo_workdir, tmp_path):
  rng = random.Random(SEED)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  # (stage, the checkpoint step after which it is killed): collab saves per epoch (2 in
  # FAST_DEMO), ground every 10 of its 40 steps (2 kept: one to fall back on), sft every 10.
  plan = [("collab", 1), ("ground", rng.choice([20, 30])), ("sft", rng.choice([10, 20]))]
  interrupted, garbled, outputs = [], None, []
  for stage, min_step in plan:
    unfinished, out = _kill_after_checkpoint(workdir, stage, min_step,
                                             delay=rng.uniform(0.0, 0.3))
    outputs.append(out)
    if unfinished:
      interrupted.append(stage)
    _check_no_partial_artifacts(workdir)
    if stage == "ground" and unfinished:
      # Also a crash that corrupted the newest checkpoint: the restart must fall back.
      garbled = _garble_newest(os.path.join(workdir, "ground", "ckpt"))
  outputs.append(_restart(workdir))
  assert interrupted == ["collab", "ground", "sft"], interrupted
  # Each restart resumed the killed stage from its checkpoint (not from scratch).
  assert "collab: resumed after epoch" in outputs[1], outputs[1][-3000:]
  assert "ground: resumed at step" in outputs[2], outputs[2][-3000:]
  assert f"checkpoint step {garbled} in" in outputs[2] and "unreadable" in outputs[2]
  assert "sft: resumed at step" in outputs[3], outputs[3][-3000:]
  for stage in STAGE_ORDER:
    assert _done(workdir, stage), stage
  _check_no_partial_artifacts(workdir)

  # Compared as a list of differing paths: asserting `bytes == bytes` directly would make
  # pytest diff megabytes of binary on failure, which takes longer than the whole suite.
  differ = []
  for rel in ARTIFACTS:
    with open(os.path.join(demo_workdir, rel), "rb") as a, \
        open(os.path.join(workdir, rel), "rb") as b:
      if a.read() != b.read():
        differ.append(rel)
  assert not differ, f"differ from the uninterrupted run: {differ}"
  step_ref, ref = _sft_params(demo_workdir)
  step, got = _sft_params(workdir)
  assert step == step_ref and ref.keys() == got.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


_POOL_DIGEST = r"""
import hashlib, types
from sigma_jax.data import pairs
words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
items = [types.SimpleNamespace(title=" ".join(words[(i * k) % 9] for k in (1, 2, 3, 5)),
                               tags=[], category_path=[]) for i in range(60)]
print(hashlib.sha256(pairs.semantic_pairs(items, seed=0).tobytes()).hexdigest())
"""


def test_pair_pools_do_not_depend_on_the_hash_seed():
  """A restarted process has another PYTHONHASHSEED; the ground stage's pairs must not change."""
  digests = set()
  for hash_seed in ("1", "2", "3"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", _POOL_DIGEST], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    digests.add(out.stdout.strip())
  assert len(digests) == 1, digests
