"""NaN guard: a non-finite loss or gradient stops a training stage, naming the stage and the
first bad step, before it can overwrite the last good checkpoint or write an artifact.

The NaN is injected mid-run through the learning-rate schedule (finite up to a step, NaN from
then on), so the run first saves good checkpoints and then goes bad between two of them.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sigma_jax.checkpoint import Checkpointer
from sigma_jax.stages import ground as ground_stage, sft as sft_stage
from sigma_jax.train import collab, optim
from sigma_jax.train.loop import NonFiniteLossError

# Reading a saved step back without a target: Orbax warns that it takes the saved shardings.
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")


def _nan_from(count, schedule):
  """`schedule` until update number `count` (0-based), NaN from then on."""
  return lambda c: jnp.where(c >= count, jnp.nan, schedule(c))


def _patch_backbone_optimizer(monkeypatch, count):
  make = optim.make_optimizer

  def patched(learning_rate, warmup_steps, total_steps, weight_decay, clip_norm=1.0):
    _, schedule = make(learning_rate, warmup_steps, total_steps, weight_decay, clip_norm)
    bad = _nan_from(count, schedule)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(bad, weight_decay=float(weight_decay)))
    return tx, bad
  monkeypatch.setattr(optim, "make_optimizer", patched)


def _saved_arrays(ckpt_dir, step):
  """The arrays of one saved step, read back without a target (numpy)."""
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as c:
    tree = c.restore(os.path.join(ckpt_dir, str(step), "state"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_good_checkpoint(ckpt_dir, expected_step):
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps()[-1] == expected_step  # nothing saved after the NaN
  arrays = _saved_arrays(ckpt_dir, expected_step)
  assert arrays and all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
  """A copy of the finished demo run without checkpoints, evaluation or DONE markers."""
  dst = str(tmp_path_factory.mktemp("nan") / "w")
  shutil.copytree(demo_workdir, dst,
                  ignore=shutil.ignore_patterns("ckpt", "DONE.json", "eval", "metrics.jsonl",
                                                "plots"))
  return dst


def _cfg(**sections):
  from configs import demo
  cfg = demo.get_config()
  cfg.progress = False
  for section, fields in sections.items():
    for k, v in fields.items():
      cfg[section][k] = v
  return cfg


def test_collab_nan_keeps_last_good_checkpoint(monkeypatch, tmp_path):
  from test_collab import _cfg as collab_cfg, _splits
  # 240 users, batch 32: 8 steps per epoch. Update 8 (step 9, epoch 2) makes the parameters
  # NaN; step 9's parameter norm is the first non-finite metric.
  monkeypatch.setattr(collab, "make_optimizer", lambda lr, wd: optax.adam(
      _nan_from(8, lambda c: lr), b1=0.9, b2=0.98))
  with pytest.raises(NonFiniteLossError, match=r"stage collab, step 9: .*last good "
                                               r"checkpoint: step 1"):
    collab.train_collab(collab_cfg(), _splits(), str(tmp_path), progress=False)
  _assert_good_checkpoint(str(tmp_path / "collab" / "ckpt"), 1)
  assert not os.path.exists(tmp_path / "collab" / "item_emb.npy")


@pytest.mark.slow
def test_ground_nan_keeps_last_good_checkpoint(monkeypatch, workdir):
  # Updates 0..19 are good: steps 10 and 20 are saved; update 20 (step 21) makes the
  # parameters NaN, so step 22's loss is the first non-finite metric.
  _patch_backbone_optimizer(monkeypatch, 20)
  emb_path = os.path.join(workdir, "ground", "item_text_emb.npy")
  with open(emb_path, "rb") as f:
    before = f.read()
  cfg = _cfg(ground=dict(steps=40, ckpt_every=10, log_every=25, eval_every=50))
  with pytest.raises(NonFiniteLossError, match=r"stage ground, step 22: .*last good "
                                               r"checkpoint: step 20"):
    ground_stage.run(cfg, workdir)
  _assert_good_checkpoint(os.path.join(workdir, "ground", "ckpt"), 20)
  with open(emb_path, "rb") as f:
    assert f.read() == before  # the artifact was not rewritten


@pytest.mark.slow
def test_sft_nan_keeps_last_good_checkpoint(monkeypatch, workdir):
  _patch_backbone_optimizer(monkeypatch, 10)
  cfg = _cfg(sft=dict(steps=20, ckpt_every=5, log_every=25))
  with pytest.raises(NonFiniteLossError, match=r"stage sft, step 12: .*last good "
                                               r"checkpoint: step 10"):
    sft_stage.run(cfg, workdir)
  _assert_good_checkpoint(os.path.join(workdir, "sft", "ckpt"), 10)
