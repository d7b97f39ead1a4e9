"""Config contradictions, found before any stage runs.

``validate(cfg, stages, workdir)`` is called by ``pipeline.run`` up front, so a setting that
cannot work (a prefix longer than the SID, more beams than prefixes, a batch the devices cannot
split) fails in a second with the fields named, not after an hour of training. Checks that belong
to one part of the library live there and are reused here (``tokenize.check_config``,
``parallel.check_batch_divisible``); checks that need the catalogue size run when the ``data``
stage has already written ``WORKDIR/data/stats.json`` (and again inside the stage itself).
"""
from __future__ import annotations

import os

from sigma_jax import parallel, utils, workdir as wd
from sigma_jax.data import raw
from sigma_jax.models import projfuse, sigma as sigma_model
from sigma_jax.train import ground, pretrain, sft, tokenize

TOKENIZER_KINDS = ("rqkmeans", "rqvae")  # what sigma_jax.models.rq.tokenize_items accepts


def check_beams(gen_cfg, tok_cfg, mode: str | None = None) -> None:
  """In ``sigma`` mode the beam search keeps K prefixes out of at most C ** prefix_len."""
  mode = mode or gen_cfg.mode
  if mode != "sigma":
    return
  k, size, prefix = int(gen_cfg.num_beams), int(tok_cfg.codebook_size), int(tok_cfg.prefix_len)
  if k > size ** prefix:
    raise ValueError(f"generation.num_beams={k} is more than the {size}^{prefix} = "
                     f"{size ** prefix} possible SID prefixes (tokenizer.codebook_size="
                     f"{size}, tokenizer.prefix_len={prefix}); lower num_beams or raise "
                     "prefix_len")


def check_dataset(ds_cfg, stages, workdir: str | None = None) -> None:
  """``dataset.name`` is a valid name, ``dataset.format`` a known format (or empty for a known
  name), and a name that is not a known one has ``dataset.manual_dir`` when its data stage will
  run."""
  raw.resolve_format(ds_cfg.name, ds_cfg.format)
  if ("data" in stages and ds_cfg.name not in raw.KNOWN_FORMATS and not ds_cfg.manual_dir
      and not (workdir and wd.is_done(workdir, "data"))):
    raise ValueError(f"dataset.name={ds_cfg.name!r} is not a known dataset "
                     f"{sorted(raw.KNOWN_FORMATS)}: set dataset.manual_dir to the directory "
                     "that holds its files (docs/DATASETS.md)")


def _num_items(workdir: str | None) -> int | None:
  if not workdir:
    return None
  path = wd.path(workdir, wd.DATA_STATS)
  if not os.path.exists(path):
    return None
  return int(utils.read_json(path)["num_items"])


def _check_sft_init(cfg, stages, workdir: str | None) -> None:
  """``sft.init``: a known value; the stage it starts from will have run; for ``grounded``, a
  finished ground stage whose tower has this config's backbone shape."""
  init = str(cfg.sft.init)
  if init not in sft.INITS:
    raise ValueError(f"sft.init must be one of {sft.INITS}, got {init!r}")
  if "sft" not in stages or init in ("auto", "scratch"):
    return
  source = "pretrain" if init == "pretrain" else "ground"
  done = bool(workdir) and wd.is_done(workdir, source)
  if source not in stages and not done:
    raise ValueError(f"sft.init={init!r} starts SFT from the '{source}' stage, which is neither "
                     "in config.stages nor done in the work directory")
  if init == "grounded" and done:
    mismatches = ground.tower_shape_mismatches(cfg.model, ground.tower_recipe(workdir))
    if mismatches:
      raise ValueError("sft.init='grounded' needs the SFT backbone to have the shape of the "
                       f"ground stage's text tower ({wd.recipe_path(workdir, 'ground')}): "
                       + "; ".join(mismatches))


def validate(cfg, stages, workdir: str | None = None, devices=None) -> None:
  """Raises ValueError naming the fields of the first contradiction in ``cfg``.

  Args:
    cfg: the experiment config.
    stages: the stage names that will run (``pipeline.parse_stages``).
    workdir: the run's work directory; when its ``data`` stage is done, catalogue-size checks
      run too.
    devices: the devices the mesh is built on (default: all).
  """
  check_dataset(cfg.dataset, stages, workdir)
  if cfg.generation.mode not in sft.MODES:
    raise ValueError(f"generation.mode must be one of {sft.MODES}, got {cfg.generation.mode!r}")
  if cfg.sft.layout not in sft.LAYOUTS:
    raise ValueError(f"sft.layout must be one of {sft.LAYOUTS}, got {cfg.sft.layout!r}")
  if cfg.sft.layout == "one_pass" and not cfg.sft.pack:
    raise ValueError("sft.layout='one_pass' shares histories inside packed rows: it needs "
                     "sft.pack=True")
  if cfg.tokenizer.kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer.kind must be one of {TOKENIZER_KINDS}, got "
                     f"{cfg.tokenizer.kind!r}")
  source = cfg.tokenizer.source
  if source not in tokenize.SOURCES:
    raise ValueError(f"tokenizer.source must be one of {sorted(tokenize.SOURCES)}, got "
                     f"{source!r}")
  tokenize.check_config(cfg.tokenizer, _num_items(workdir))
  if str(cfg.sft.text_features) not in projfuse.TEXT_FEATURES:
    raise ValueError(f"sft.text_features must be one of {sorted(projfuse.TEXT_FEATURES)}, got "
                     f"{cfg.sft.text_features!r}")
  neg = str(cfg.sft.id_negatives)
  if neg not in sigma_model.ID_NEGATIVES:
    raise ValueError(f"sft.id_negatives must be one of {sigma_model.ID_NEGATIVES}, got {neg!r}")
  use = str(cfg.pretrain.use)
  if use not in pretrain.USE_CHOICES:
    raise ValueError(f"pretrain.use must be one of {pretrain.USE_CHOICES}, got {use!r}")
  if (use == "always" and {"ground", "sft"} & set(stages) and "pretrain" not in stages
      and not (workdir and wd.is_done(workdir, "pretrain"))):
    raise ValueError("pretrain.use='always' but the 'pretrain' stage is neither in "
                     "config.stages nor done in the work directory")
  _check_sft_init(cfg, stages, workdir)
  fixed = float(cfg.generation.apf_fixed_sigma)
  if fixed < 0:
    raise ValueError(f"generation.apf_fixed_sigma={fixed} is negative; 0 is the adaptive σ, "
                     "> 0 a fixed one")
  if fixed > 0 and not (cfg.generation.fuse and cfg.generation.mode == "sigma"):
    raise ValueError(f"generation.apf_fixed_sigma={fixed} fixes APF's σ, but APF does not run "
                     f"(generation.fuse={cfg.generation.fuse}, generation.mode="
                     f"{cfg.generation.mode!r})")
  if cfg.generation.get("eval_sample", "first") not in ("first", "random"):
    raise ValueError(f"generation.eval_sample must be 'first' or 'random', got "
                     f"{cfg.generation.eval_sample!r}")
  if cfg.generation.get("constraints", "hard") not in ("hard", "soft"):
    raise ValueError(f"generation.constraints must be 'hard' or 'soft', got "
                     f"{cfg.generation.constraints!r}")
  if cfg.generation.get("instruction", "given") not in ("given", "none"):
    raise ValueError(f"generation.instruction must be 'given' or 'none', got "
                     f"{cfg.generation.instruction!r}")
  if int(cfg.generation.get("prompt_bucket", 0)) < 0:
    raise ValueError(f"generation.prompt_bucket={cfg.generation.prompt_bucket} is negative; 0 "
                     "keeps prompts at sft.max_len, > 0 cuts them to a multiple of it")
  check_beams(cfg.generation, cfg.tokenizer)
  # Device-dependent checks only for the stages that will shard a batch.
  if {"pretrain", "ground", "sft"} & set(stages):
    mesh = parallel.make_mesh(cfg.mesh, devices)
    if "pretrain" in stages:
      parallel.check_batch_divisible("pretrain.batch_size", int(cfg.pretrain.batch_size), mesh)
    if "ground" in stages:
      # A ground step embeds both sides of its B pairs: 2B items.
      parallel.check_batch_divisible("ground.batch_pairs x 2", 2 * int(cfg.ground.batch_pairs), mesh)
    if "sft" in stages:
      parallel.check_batch_divisible("sft.batch_size", int(cfg.sft.batch_size), mesh)
