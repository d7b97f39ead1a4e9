"""The entry point: stages, skipping finished ones, config overrides, config files."""
import json
import os
import subprocess
import sys

import pytest

from configs import base
from sigma_jax import pipeline, workdir as wd

from conftest import ROOT, SUBPROCESS_XLA_FLAGS


def _train(workdir, *overrides, config="configs/demo.py"):
  env = dict(os.environ)
  env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
  return subprocess.run(
      [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
       *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_data_stage_from_the_command_line_then_skipped(tmp_path):
  workdir = str(tmp_path / "w")
  out = _train(workdir, "--config.stages=data", "--config.dataset.max_history=10")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "data", "stats.json")) as f:
    stats = json.load(f)
  assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (300, 2450, 10664)
  assert stats["splits"]["validation"]["interactions"] == 300
  assert stats["splits"]["train"]["interactions"] == 10664 - 600
  assert stats["protocol"]["max_history"] == 10  # the override reached the config
  same = _train(workdir, "--config.stages=data", "--config.dataset.max_history=10")
  assert same.returncode == 0, same.stderr[-3000:]
  assert "already done, skipped" in same.stderr
  assert "another config" not in same.stderr
  # A finished stage is still reused under a changed config, but not silently.
  again = _train(workdir, "--config.stages=data")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already done, skipped" in again.stderr
  assert "was finished under another config (dataset.max_history: 10 -> 20)" in again.stderr
  # launch.compare runs strict: a table must not mix recipes.
  cfg = __import__("configs.demo", fromlist=["get_config"]).get_config()
  cfg.stages = "data"
  with pytest.raises(ValueError, match=r"dataset.max_history: 10 -> 20"):
    pipeline.run(cfg, workdir, strict=True)
  cfg.dataset.max_history = 10
  cfg.progress = False  # not part of the recipe
  assert pipeline.run(cfg, workdir, strict=True)["data"]["num_users"] == 300


def _record_recipe(workdir, stage, recipe):
  """Writes ``recipe`` as stage ``stage``'s recorded recipe in ``workdir``."""
  os.makedirs(os.path.join(workdir, stage))
  with open(wd.recipe_path(workdir, stage), "w") as f:
    json.dump(recipe, f)


def test_a_recipe_from_before_a_new_key_matches_its_old_behaviour(tmp_path):
  """sft.similarity was added later: a recorded recipe without it equals 'cosine', what those
  runs did, and differs from 'dot'."""
  cfg = base.base_config()
  workdir = str(tmp_path)
  old = pipeline.recipe(cfg, "sft", workdir)
  del old["sft.similarity"]
  _record_recipe(workdir, "sft", old)
  assert pipeline.recipe_changes(cfg, workdir, "sft") == []
  cfg.sft.similarity = "dot"
  assert pipeline.recipe_changes(cfg, workdir, "sft") == ["sft.similarity: 'cosine' -> 'dot'"]


def test_a_data_recipe_from_before_dataset_format_is_unchanged(tmp_path):
  """dataset.format was added later: a data stage recorded without it is not 'changed'."""
  cfg = base.base_config()
  workdir = str(tmp_path)
  old = pipeline.recipe(cfg, "data", workdir)
  del old["dataset.format"]
  _record_recipe(workdir, "data", old)
  assert pipeline.recipe_changes(cfg, workdir, "data") == []
  cfg.dataset.format = "amazon_p5"
  assert pipeline.recipe_changes(cfg, workdir, "data") == ["dataset.format: '' -> 'amazon_p5'"]


def test_a_recipe_with_a_renamed_key_reads_under_the_new_name(tmp_path):
  """sft.every_position=True was renamed sft.layout='sequence' (False: 'per_position')."""
  cfg = base.base_config()
  workdir = str(tmp_path)
  old = pipeline.recipe(cfg, "sft", workdir)
  assert old.pop("sft.layout") == "sequence"
  old["sft.every_position"] = True
  _record_recipe(workdir, "sft", old)
  assert pipeline.recipe_changes(cfg, workdir, "sft") == []
  cfg.sft.layout = "per_position"
  assert pipeline.recipe_changes(cfg, workdir, "sft") == [
      "sft.layout: 'sequence' -> 'per_position'"]


def test_bad_override_and_unknown_stage_fail_clearly(tmp_path):
  out = _train(str(tmp_path / "w"), "--config.stages=data,fly")
  assert out.returncode != 0
  assert "unknown stage(s) ['fly']" in out.stderr
  out = _train(str(tmp_path / "w"), "--config.collab.no_such_field=3")
  assert out.returncode != 0
  assert "no_such_field" in out.stderr


@pytest.mark.parametrize("module", ["beauty", "scientific", "movielens", "demo"])
def test_every_config_file_loads(module):
  cfg = __import__(f"configs.{module}", fromlist=["get_config"]).get_config()
  assert cfg.dataset.name == module
  assert pipeline.parse_stages(cfg.stages)[0] == "data"
  assert cfg.dataset.max_history == 20


def test_stage_order_is_fixed():
  assert pipeline.parse_stages("data") == ["data"]
  assert pipeline.parse_stages("eval,data") == ["data", "eval"]
  # "default" is every stage but the optional pretrain, in the one order pipeline.STAGES gives.
  assert pipeline.parse_stages("default") == ["data", "text_tokenizer", "collab", "ground",
                                              "tokenize", "sft", "eval"]
  assert list(pipeline.STAGES) == ["data", "text_tokenizer", "collab", "pretrain", "ground",
                                   "tokenize", "sft", "eval"]
  with pytest.raises(ValueError, match="config.stages is empty"):
    pipeline.parse_stages(" , ")
  with pytest.raises(ValueError, match="unknown backbone size"):
    base.backbone("huge")


def _tfrecords(path):
  """The payloads of a TFRecord file (TensorBoard event files use this framing)."""
  import struct
  with open(path, "rb") as f:
    data = f.read()
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_training_stages_write_tensorboard_events(demo_workdir):
  """Each training stage's log lines also go to TensorBoard event files, step for step."""
  from tensorboardX.proto import event_pb2
  for stage in ("collab", "ground", "sft"):
    d = wd.tensorboard_dir(demo_workdir, stage)
    files = [os.path.join(d, f) for f in os.listdir(d) if f.startswith("events.out.tfevents")]
    assert files, f"no event file in {d}"
    scalars = {}
    for path in files:
      for payload in _tfrecords(path):
        ev = event_pb2.Event.FromString(payload)
        for v in ev.summary.value:
          scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
    with open(wd.metrics_log(demo_workdir, stage)) as f:
      logged = [json.loads(line) for line in f]
    key = "train_loss" if stage == "collab" else "loss"
    assert sorted(scalars[key]) == [r["step"] for r in logged]
    for r in logged:
      assert abs(scalars[key][r["step"]] - r[key]) < 1e-5 * max(1.0, abs(r[key]))
