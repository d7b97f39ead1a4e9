"""Config contradictions, found before any stage runs.

``validate(cfg, workdir)`` is called by ``pipeline.run`` up front, so a setting that cannot work
(a prefix longer than the SID, more beams than prefixes, a batch the devices cannot split) fails
in a second with the fields named, not after an hour of training. Checks that belong to one stage
live in that stage's module and are reused here (``tokenize.check_config``,
``parse_stages``); checks that need the catalogue size run when the ``data`` stage has already
written ``WORKDIR/data/stats.json`` (and again inside the stage itself).
"""
from __future__ import annotations

import os

TOKENIZER_KINDS = ("rqkmeans", "rqvae")  # what sigma_jax.models.rq.tokenize_items accepts


def check_batch_divisible(field: str, batch_size: int, mesh) -> None:
  """A global batch must split evenly over the data-parallel devices (mesh.data x mesh.fsdp)."""
  dp = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if int(batch_size) % dp:
    raise ValueError(f"{field}={batch_size} is not divisible by the {dp} data-parallel devices "
                     f"(mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")


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


def _num_items(workdir: str | None) -> int | None:
  if not workdir:
    return None
  path = os.path.join(workdir, "data", "stats.json")
  if not os.path.exists(path):
    return None
  from sigma_jax import utils
  return int(utils.read_json(path)["num_items"])


def validate(cfg, workdir: str | None = None, devices=None) -> None:
  """Raises ValueError naming the fields of the first contradiction in ``cfg``.

  Args:
    cfg: the experiment config.
    workdir: the run's work directory; when its ``data`` stage is done, catalogue-size checks
      run too.
    devices: the devices the mesh is built on (default: all).
  """
  from sigma_jax import parallel, pipeline
  from sigma_jax.train import sft, tokenize

  stages = pipeline.parse_stages(cfg.stages)
  if cfg.generation.mode not in sft.MODES:
    raise ValueError(f"generation.mode must be one of {sft.MODES}, got {cfg.generation.mode!r}")
  if cfg.tokenizer.kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer.kind must be one of {TOKENIZER_KINDS}, got "
                     f"{cfg.tokenizer.kind!r}")
  source = cfg.tokenizer.get("source", "grounded")
  if source not in tokenize.SOURCES:
    raise ValueError(f"tokenizer.source must be one of {sorted(tokenize.SOURCES)}, got "
                     f"{source!r}")
  tokenize.check_config(cfg.tokenizer, _num_items(workdir))
  from sigma_jax.models import sigma as sigma_model
  neg = str(cfg.sft.get("id_negatives", "batch"))
  if neg not in sigma_model.ID_NEGATIVES:
    raise ValueError(f"sft.id_negatives must be one of {sigma_model.ID_NEGATIVES}, got {neg!r}")
  if "pretrain" in cfg:
    from sigma_jax.train import pretrain
    use = str(cfg.pretrain.use)
    if use not in pretrain.USE_CHOICES:
      raise ValueError(f"pretrain.use must be one of {pretrain.USE_CHOICES}, got {use!r}")
    if (use == "always" and {"ground", "sft"} & set(stages) and "pretrain" not in stages
        and not (workdir and pipeline.is_done(workdir, "pretrain"))):
      raise ValueError("pretrain.use='always' but the 'pretrain' stage is neither in "
                       "config.stages nor done in the work directory")
  check_beams(cfg.generation, cfg.tokenizer)
  # Device-dependent checks only for the stages that will shard a batch.
  if {"pretrain", "ground", "sft"} & set(stages):
    mesh = parallel.make_mesh(cfg.mesh, devices)
    if "pretrain" in stages:
      check_batch_divisible("pretrain.batch_size", int(cfg.pretrain.batch_size), mesh)
    if "ground" in stages:
      # A ground step embeds both sides of its B pairs: 2B items.
      check_batch_divisible("ground.batch_pairs x 2", 2 * int(cfg.ground.batch_pairs), mesh)
    if "sft" in stages:
      check_batch_divisible("sft.batch_size", int(cfg.sft.batch_size), mesh)
