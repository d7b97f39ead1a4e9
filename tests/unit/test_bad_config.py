"""Contradictory configs fail up front with the fields named (sigma_jax/config_checks.py)."""
import json
import os

import jax
import pytest

from configs import demo
from sigma_jax import parallel, pipeline
from sigma_jax.train import tokenize


def _cfg(**overrides):
  cfg = demo.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    cfg[section][field] = value
  return cfg


@pytest.mark.parametrize("module", ["beauty", "scientific", "movielens", "demo"])
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_shipped_configs_are_valid(module, arg):
  cfg = __import__(f"configs.{module}", fromlist=["get_config"]).get_config(arg)
  pipeline.validate(cfg)


@pytest.mark.parametrize("overrides, message", [
    (dict(tokenizer__prefix_len=4), r"tokenizer\.prefix_len=4 .* tokenizer\.levels=3"),
    (dict(tokenizer__levels=0), r"tokenizer\.levels must be >= 1"),
    # demo: codebook 16, prefix 1 -> 16 prefixes; 20 beams cannot all be distinct prefixes.
    (dict(generation__num_beams=20),
     r"generation\.num_beams=20 .* 16\^1 = 16 .*tokenizer\.codebook_size=16, "
     r"tokenizer\.prefix_len=1"),
    (dict(generation__mode="tiger"), r"generation\.mode must be one of .* got 'tiger'"),
    (dict(tokenizer__kind="vq"), r"tokenizer\.kind must be one of .* got 'vq'"),
    (dict(tokenizer__source="image"), r"tokenizer\.source must be one of .* got 'image'"),
    (dict(sft__layout="rows"), r"sft\.layout must be one of .* got 'rows'"),
    (dict(sft__layout="one_pass", sft__pack=False), r"one_pass.*needs sft\.pack=True"),
    (dict(sft__init="warm"), r"sft\.init must be one of .* got 'warm'"),
    (dict(generation__apf_fixed_sigma=-1.0), r"generation\.apf_fixed_sigma=-1\.0 is negative"),
    (dict(generation__constraints="loose"), r"generation\.constraints must be 'hard' or 'soft'"),
    (dict(generation__instruction="empty"), r"generation\.instruction must be 'given' or 'none'"),
    (dict(generation__eval_sample="head"),
     r"generation\.eval_sample must be 'first' or 'random', got 'head'"),
    (dict(generation__prompt_bucket=-8), r"generation\.prompt_bucket=-8 is negative"),
    (dict(generation__apf_fixed_sigma=1.0, generation__fuse=False),
     r"apf_fixed_sigma=1\.0 fixes APF's σ, but APF does not run \(generation\.fuse=False"),
    # The default stages leave the optional pretrain stage out.
    (dict(sft__init="pretrain"), r"sft\.init='pretrain' starts SFT from the 'pretrain' stage, "
                                 r"which is neither in config\.stages nor done"),
    # 8 fake devices, all on the data axis.
    (dict(sft__batch_size=12), r"sft\.batch_size=12 is not divisible by the 8 data-parallel"),
    (dict(ground__batch_pairs=3),
     r"ground\.batch_pairs x 2=6 is not divisible by the 8 data-parallel"),
    (dict(mesh__model=3), r"mesh .* the fixed axes need a multiple of 3 devices"),
    (dict(dataset__name="my_shop"),
     r"unknown dataset 'my_shop' \(dataset\.name\) and no dataset\.format"),
    (dict(dataset__name="my_shop", dataset__format="amazon_p5"),
     r"dataset\.name='my_shop' is not a known dataset .* set dataset\.manual_dir"),
    (dict(dataset__name="my_shop", dataset__format="csv", dataset__manual_dir="/d"),
     r"dataset\.format='csv' is not a known file format; choose from \['amazon_p5', "
     r"'movielens', 'unisrec'\]"),
    (dict(dataset__format="unisrec"),
     r"dataset\.name='demo' is the known dataset in format 'movielens', but "
     r"dataset\.format='unisrec'"),
    (dict(dataset__name="My Shop", dataset__format="amazon_p5", dataset__manual_dir="/d"),
     r"dataset\.name='My Shop' is not a valid dataset name"),
])
def test_contradiction_names_the_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    pipeline.validate(_cfg(**overrides))


def test_free_dataset_name_with_format_and_files():
  pipeline.validate(_cfg(dataset__name="my_shop", dataset__format="amazon_p5",
                         dataset__manual_dir="/data/my_shop"))
  pipeline.validate(_cfg(dataset__format="movielens"))  # the format the name implies


def test_sft_init_needs_the_stage_it_starts_from(tmp_path):
  cfg = _cfg(sft__init="grounded")
  pipeline.validate(cfg)  # the default stages run ground before sft
  cfg.stages = "sft"
  with pytest.raises(ValueError, match=r"sft\.init='grounded' starts SFT from the 'ground' "
                                       r"stage, which is neither"):
    pipeline.validate(cfg, str(tmp_path))
  cfg = _cfg(sft__init="pretrain")
  cfg.stages = "data,text_tokenizer,collab,pretrain,ground,tokenize,sft"
  pipeline.validate(cfg)  # ... unless it runs first
  for init in ("auto", "scratch"):  # need nothing
    pipeline.validate(_cfg(sft__init=init))


def test_beams_fit_a_longer_prefix_and_other_modes():
  pipeline.validate(_cfg(generation__num_beams=20, tokenizer__prefix_len=2))
  pipeline.validate(_cfg(generation__num_beams=20, generation__mode="gr_sid"))


def test_unknown_stage():
  cfg = demo.get_config()
  cfg.stages = "data,collab,fly"
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['fly'\]"):
    pipeline.validate(cfg)


def test_batch_checks_only_for_stages_that_run():
  cfg = _cfg(sft__batch_size=12)
  cfg.stages = "data,text_tokenizer,collab"
  pipeline.validate(cfg)
  # The same batch is fine on one device.
  pipeline.validate(_cfg(sft__batch_size=12), devices=jax.devices()[:1])


def test_codebook_too_small_for_the_catalogue(tmp_path):
  # 16^2 = 256 codes cannot name 300 items without the de-duplication level.
  cfg = _cfg(tokenizer__levels=2, tokenizer__dedup=False)
  pipeline.validate(cfg, str(tmp_path))  # catalogue size not known yet: passes
  os.makedirs(tmp_path / "data")
  with open(tmp_path / "data" / "stats.json", "w") as f:
    json.dump({"num_items": 300}, f)
  with pytest.raises(ValueError, match=r"tokenizer: 16\^2 = 256 codes cannot name 300 items"):
    pipeline.validate(cfg, str(tmp_path))
  with pytest.raises(ValueError, match=r"codebook_size=16 is larger than the catalogue"):
    tokenize.check_config(cfg.tokenizer, 10)  # the same check the tokenize stage runs
  cfg.tokenizer.dedup = True
  pipeline.validate(cfg, str(tmp_path))


def test_sft_stage_uses_the_same_batch_check():
  mesh = parallel.make_mesh(dict(data=4, fsdp=2, model=1))
  parallel.check_batch_divisible("sft.batch_size", 16, mesh)
  with pytest.raises(ValueError, match=r"sft\.batch_size=12 .* 8 data-parallel devices "
                                       r"\(mesh\.data x mesh\.fsdp = 4 x 2\)"):
    parallel.check_batch_divisible("sft.batch_size", 12, mesh)


def test_pipeline_run_validates_before_any_stage(monkeypatch, tmp_path):
  """pipeline.run checks the config before the first stage runs (nothing is written)."""
  for name in list(pipeline.STAGES):
    monkeypatch.setitem(pipeline.STAGES, name,
                        lambda cfg, workdir: pytest.fail("a stage ran before validation"))
  with pytest.raises(ValueError, match=r"tokenizer\.prefix_len=4"):
    pipeline.run(_cfg(tokenizer__prefix_len=4), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "data")
