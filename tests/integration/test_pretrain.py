"""Optional stage pretrain: it lowers the held-out LM loss, and later stages start from it."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from sigma_jax import pipeline
from sigma_jax.models import backbone
from sigma_jax.train import pretrain


def _cfg(**pretrain_overrides):
  cfg = demo.get_config()
  cfg.progress = False
  cfg.pretrain.update(dict(steps=60, batch_size=32, log_every=20, ckpt_every=30,
                           learning_rate=3e-3, warmup_steps=10), **pretrain_overrides)
  return cfg


@pytest.fixture(scope="module")
def pretrained_workdir(demo_workdir, tmp_path_factory):
  """A work directory with the demo's data and text tokenizer, then stage pretrain."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  for name in ("data", "tfds", "text_tokenizer"):
    shutil.copytree(os.path.join(demo_workdir, name), os.path.join(workdir, name))
  cfg = _cfg()
  cfg.stages = "pretrain"
  pipeline.run(cfg, workdir)
  return workdir


@pytest.mark.slow
def test_pretrain_lowers_heldout_loss(pretrained_workdir):
  with open(os.path.join(pretrained_workdir, "pretrain", "report.json")) as f:
    report = json.load(f)
  loss = report["heldout_lm_loss"]
  assert report["heldout_items"] > 0
  # Untrained: about log(vocab); 60 steps must already be far below it.
  assert loss["before"] > 6.0
  assert loss["after"] < loss["before"] - 1.0, loss
  with open(os.path.join(pretrained_workdir, "pretrain", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [20, 30, 40, 60]
  assert os.path.isdir(pretrain.backbone_dir(pretrained_workdir))


def _fresh_backbone(cfg, vocab):
  mcfg = pretrain.model_config(cfg, vocab)
  return nnx.split(backbone.Decoder(mcfg, rngs=nnx.Rngs(123)), nnx.Param)[1]


def test_later_stages_load_pretrained_weights(pretrained_workdir):
  cfg = _cfg()
  from sigma_jax.data import text
  spm = text.TextTokenizer(text.model_path(pretrained_workdir)).spm_size
  # The SFT backbone has SID tokens after the SentencePiece pieces: a larger vocabulary.
  fresh = _fresh_backbone(cfg, spm + 40)
  loaded, used = pretrain.load_into(fresh, pretrained_workdir, cfg, spm)
  assert used
  ref, _ = pretrain.load_into(_fresh_backbone(cfg, spm), pretrained_workdir, cfg, spm)
  emb_new, emb_ref = np.asarray(loaded["embedding"][...]), np.asarray(ref["embedding"][...])
  np.testing.assert_array_equal(emb_new[:spm], emb_ref)  # pretrained rows copied
  np.testing.assert_array_equal(emb_new[spm:], np.asarray(fresh["embedding"][...])[spm:])
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref)):
    if a.shape == b.shape:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and they are not the fresh initialisation.
  assert not np.allclose(np.asarray(fresh["embedding"][...])[:spm], emb_new[:spm])


def test_use_never_and_always(pretrained_workdir, tmp_path):
  from sigma_jax.data import text
  spm = text.TextTokenizer(text.model_path(pretrained_workdir)).spm_size
  cfg = _cfg(use="never")
  fresh = _fresh_backbone(cfg, 50)
  out, used = pretrain.load_into(fresh, pretrained_workdir, cfg, 50)
  assert not used and out is fresh
  cfg = _cfg(use="always")
  with pytest.raises(FileNotFoundError, match="pretrain.use='always'"):
    pretrain.load_into(fresh, str(tmp_path), cfg, 50)
  cfg = _cfg(use="sometimes")
  with pytest.raises(ValueError, match="pretrain.use"):
    pretrain.resolve(cfg, str(tmp_path))
  # A model that changed shape since pretraining is named, not silently half-loaded.
  cfg = _cfg()
  cfg.model.mlp_dim = 2 * cfg.model.mlp_dim
  other = nnx.split(backbone.Decoder(pretrain.model_config(cfg, spm), rngs=nnx.Rngs(0)),
                    nnx.Param)[1]
  with pytest.raises(ValueError, match="shape"):
    pretrain.load_into(other, pretrained_workdir, _cfg(), spm)
