"""sft.init: where the SFT backbone starts. 'grounded' copies the ground stage's text tower (the
backbone is the text tower, DESIGN §2); the choice is part of the sft stage's recipe."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from configs import demo
from sigma_jax import config_checks, parallel, pipeline, workdir as wd
from sigma_jax.train import ground, sft
from conftest import FAST_DEMO


def _cfg(init="grounded"):
  """The demo config the `demo_workdir` fixture ran (FAST_DEMO's overrides), with ``init``."""
  cfg = demo.get_config()
  for flag in FAST_DEMO:
    dotted, value = flag[len("--config."):].split("=")
    section, field = dotted.split(".")
    cfg[section][field] = type(cfg[section][field])(value)
  cfg.progress = False
  cfg.sft.init = init
  return cfg


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_grounded_init_is_the_text_tower(demo_workdir):
  cfg = _cfg()
  mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  assets = sft.load_assets(cfg, demo_workdir)
  spm = assets.tok.spm_size
  _, fresh = sft.build_model(cfg, assets, mesh)
  _, state, *_ = sft.init_state(cfg, assets, mesh, 10, demo_workdir)
  tower, step = ground.load_tower_backbone(cfg, demo_workdir, spm, mesh)
  # The tower behind item_text_emb.npy: the ground stage's best-validation step.
  with open(wd.done_marker(demo_workdir, "ground")) as f:
    assert step == json.load(f)["best_step"]
  got, want, init = (_flat(state["params"]["backbone"]), _flat(tower),
                     _flat(fresh["backbone"]))
  assert set(got) == set(want)  # tied embeddings: no head outside the tower
  for name, w in want.items():
    if name.startswith("['embedding']"):
      assert w.shape[0] == spm < got[name].shape[0]
      np.testing.assert_array_equal(got[name][:spm], w)  # the SentencePiece rows
      # The SID token rows: the fresh initialisation, not anything of the tower's.
      np.testing.assert_array_equal(got[name][spm:], init[name][spm:])
      assert not np.allclose(got[name][:spm], init[name][:spm])
    else:
      np.testing.assert_array_equal(got[name], w)  # every layer and norm, exactly
  assert any(not np.array_equal(got[n], init[n]) for n in want if "layers" in n)
  # Outside the backbone (ProjFuse, q_proj) everything starts fresh.
  for part in ("projfuse", "q_proj"):
    for name, x in _flat(fresh[part]).items():
      np.testing.assert_array_equal(_flat(state["params"][part])[name], x)


@pytest.mark.slow
def test_ground_stage_without_tower_dir_falls_back_to_its_last_checkpoint(demo_workdir,
                                                                          tmp_path, caplog):
  """A ground stage run before ground/tower existed: its training checkpoint's tower (in the
  demo run the best step is the last, so both are the same weights)."""
  cfg = _cfg()
  mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  src = wd.stage_dir(demo_workdir, "ground")
  assert os.path.isdir(wd.path(demo_workdir, wd.GROUND_TOWER))
  shutil.copytree(src, tmp_path / "ground", ignore=shutil.ignore_patterns("tower"))
  spm = sft.load_assets(cfg, demo_workdir).tok.spm_size
  best, _ = ground.load_tower_backbone(cfg, demo_workdir, spm, mesh)
  with caplog.at_level(logging.WARNING):
    last, step = ground.load_tower_backbone(cfg, str(tmp_path), spm, mesh)
  assert step == cfg.ground.steps and "not at its best-validation step" in caplog.text
  for name, x in _flat(best).items():
    np.testing.assert_array_equal(_flat(last)[name], x)


@pytest.mark.slow
def test_auto_and_scratch_without_pretrain_are_the_fresh_model(demo_workdir):
  mesh = parallel.make_mesh(_cfg().mesh, devices=jax.devices()[:1])
  for init in ("auto", "scratch"):
    cfg = _cfg(init)
    assets = sft.load_assets(cfg, demo_workdir)
    _, fresh = sft.build_model(cfg, assets, mesh)
    _, state, *_ = sft.init_state(cfg, assets, mesh, 10, demo_workdir)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(fresh)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_grounded_shape_mismatch_is_named(demo_workdir):
  cfg = _cfg()
  config_checks.validate(cfg, ["sft"], demo_workdir)  # the tower's shape: fine
  cfg.model.num_layers = cfg.model.num_layers + 1
  with pytest.raises(ValueError, match=r"sft\.init='grounded' .* model\.num_layers: text tower "
                                       r"2, here 3"):
    config_checks.validate(cfg, ["sft"], demo_workdir)
  # Past the check (the library called directly), the copy names the parameter and both shapes.
  cfg = _cfg()
  cfg.model.mlp_dim = 2 * cfg.model.mlp_dim
  mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  assets = sft.load_assets(cfg, demo_workdir)
  with pytest.raises(ValueError, match=r"text tower .* parameter \['layers'\]\[0\]\['mlp'\]"
                                       r"\['gate'\]\.value has shape \(32, 64\); this model's "
                                       r"is \(32, 128\)"):
    sft.init_state(cfg, assets, mesh, 10, demo_workdir)


@pytest.mark.slow
def test_init_is_part_of_the_sft_recipe(demo_workdir, tmp_path):
  recorded = pipeline.recipe(_cfg("auto"), "sft", demo_workdir)
  assert recorded["sft.init"] == "auto"
  assert pipeline.recipe_changes(_cfg("auto"), demo_workdir, "sft") == []
  assert pipeline.recipe_changes(_cfg(), demo_workdir, "sft") == [
      "sft.init: 'auto' -> 'grounded'"]
  # A recipe written before sft.init existed reads as 'auto' (what those runs did).
  os.makedirs(tmp_path / "sft")
  old = {k: v for k, v in recorded.items() if k != "sft.init"}
  with open(wd.recipe_path(str(tmp_path), "sft"), "w") as f:
    json.dump(old, f)
  assert pipeline.recipe_changes(_cfg("auto"), str(tmp_path), "sft") == []
  assert pipeline.recipe_changes(_cfg(), str(tmp_path), "sft") == [
      "sft.init: 'auto' -> 'grounded'"]
