"""Instruction tuning (SFT) of the backbone + ProjFuse + `<q>` head: the library the ``sft`` stage,
serving, evaluation, the benchmark and the multi-host check share.

``setup`` builds everything one SFT run needs (assets, examples, model and optimizer state, the
jitted step, the batches); ``load_assets`` and ``load_params`` are what inference needs.

Training examples: every task the dataset allows (``data/tasks.py``), training split only.
JustForYou trains in the layout ``sft.layout`` names (``LAYOUTS``);
the other tasks one target per example. Batches are positions of a grain index dataset, so a
killed run resumes at its checkpointed step with the same batches.

Writes ``WORKDIR/sft/ckpt`` (Orbax: params, optimizer, step), ``metrics.jsonl`` (each loss part,
gradient norm, tokens/s) and ``tasks.json`` (examples per task and split).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sigma_jax import checkpoint, distributed, parallel, workdir as wd
from sigma_jax.data import loader, prompts, tasks, text
from sigma_jax.data.splits import PAD_ITEM
from sigma_jax.models import backbone, projfuse, sigma
from sigma_jax.train import ground, optim, pretrain, tokenize

MODES = ("sigma", "gr_sid", "gr_id")
# JustForYou training layouts (sft.layout): one sequence per user with a loss at every history
# position; one example per history position (predicted where evaluation predicts); or the same
# examples as per_position, batched user by user, with each user's history computed once for all
# its positions (``prompts.pack`` with shared histories; the same per-example loss).
LAYOUTS = ("sequence", "per_position", "one_pass")
# Where the backbone starts (sft.init): as pretrain.use says (the behaviour before the option),
# the pretrain stage's decoder (required), fresh, or the ground stage's text tower.
INITS = ("auto", "pretrain", "scratch", "grounded")


def uses_sequence_layout(cfg, mode: str) -> bool:
  """Whether JustForYou trains one sequence per user (``sft.layout='sequence'``); gr_sid, whose
  full-SID histories would not fit one sequence, always trains per position."""
  if cfg.sft.layout not in LAYOUTS:
    raise ValueError(f"sft.layout must be one of {LAYOUTS}, got {cfg.sft.layout!r}")
  return cfg.sft.layout == "sequence" and mode != "gr_sid"


@dataclasses.dataclass
class Assets:
  """Everything a prompt or a generator needs besides the model parameters."""
  tok: text.TextTokenizer
  spec: prompts.PromptSpec
  feats: np.ndarray  # [N, F]
  sids: np.ndarray  # [N, L(+1)]
  prefix_ids: np.ndarray  # [N]
  bucket_table: np.ndarray  # [P, Bmax]
  bucket_sizes: np.ndarray  # [P]
  verb_ids: list
  mode: str


def load_assets(cfg, workdir: str) -> Assets:
  """The Assets of ``workdir``'s tokenize stage (SIDs, buckets) and text tokenizer."""
  tz = tokenize.load(workdir)
  sids = tz["sids"]
  levels = int(cfg.tokenizer.levels)
  dedup = int(sids[:, levels:].max()) + 1 if sids.shape[1] > levels else 0
  tok = text.TextTokenizer(text.model_path(workdir), levels=levels,
                           codebook_size=int(cfg.tokenizer.codebook_size), dedup_size=dedup)
  feats = projfuse.item_features(workdir, cfg.sft.extra_features, str(cfg.sft.text_features))
  return make_assets(cfg, tok, sids, feats,
                     (tz["prefix_ids"], tz["bucket_table"], tz["bucket_sizes"]))


def make_assets(cfg, tok, sids: np.ndarray, feats: np.ndarray, buckets: tuple) -> Assets:
  """Assets for ``cfg.generation.mode`` from a tokenizer and a catalogue (``load_assets``'s
  second half; tests build synthetic ones with it).

  Args:
    cfg: the config (``generation.mode``, ``tokenizer.prefix_len``, ``sft.max_len``).
    tok: a ``text.TextTokenizer`` (or ``generate.testing.SyntheticTokenizer``).
    sids: [N, L(+1)] every item's SID (with the de-duplication level when there is one).
    feats: [N, F] ProjFuse inputs.
    buckets: (prefix_ids [N], bucket_table [P, Bmax], bucket_sizes [P]) of the
      ``tokenizer.prefix_len`` prefixes (``rq.prefix_buckets``).
  """
  mode = cfg.generation.mode
  if mode not in MODES:
    raise ValueError(f"generation.mode must be one of {MODES}, got {mode!r}")
  prefix_ids, table, sizes = buckets
  if mode == "sigma":
    item_tokens = prompts.item_token_table(tok, sids, int(cfg.tokenizer.prefix_len))
  elif mode == "gr_sid":
    item_tokens = np.stack([tok.sid_token(lv, sids[:, lv]) for lv in range(sids.shape[1])],
                           axis=1).astype(np.int32)
  else:  # gr_id: no prefix; one bucket holds every item
    n = len(sids)
    item_tokens = np.zeros((n, 0), np.int32)
    prefix_ids, table, sizes = (np.zeros(n, np.int32), np.arange(n, dtype=np.int32)[None],
                                np.array([n], np.int32))
  # gr_sid (TIGER-style): items are their full SIDs alone, no <q> and no injected embedding.
  spec = prompts.PromptSpec(tok=tok, item_tokens=item_tokens, max_len=int(cfg.sft.max_len),
                            sid_only=mode == "gr_sid")
  return Assets(tok, spec, feats, sids, prefix_ids, table, sizes,
                tok.encode(prompts.HISTORY_VERB), mode)


def model_config(cfg, assets: Assets):
  m = cfg.model.copy_and_resolve_references()
  m.vocab_size = assets.tok.vocab_size
  m.max_len = int(cfg.sft.max_len)
  return m


def _new_model(cfg, assets: Assets) -> sigma.SigmaModel:
  """A freshly initialised SigmaModel for this config and catalogue (call under eval_shape or
  init_sharded)."""
  return sigma.SigmaModel(model_config(cfg, assets), assets.feats.shape[1],
                          int(cfg.sft.projfuse_hidden), rngs=nnx.Rngs(int(cfg.seed)),
                          similarity=str(cfg.sft.similarity))


def build_model(cfg, assets: Assets, mesh):
  """(graphdef, params) of a freshly initialised SigmaModel, born sharded."""
  return parallel.init_sharded(lambda: _new_model(cfg, assets), mesh, cfg.axis_rules)


def task_list(spec: str):
  """'a,b' -> ['a', 'b']; '' -> None (every available task)."""
  names = [t.strip() for t in (spec or "").split(",") if t.strip()]
  return names or None


# The arrays of a packed batch that are [R, T] rows (the rest are per example).
PACKED_ROW_KEYS = ("tokens", "inject_items", "attn_mask", "segment_ids", "positions",
                   "branch_ids")


@dataclasses.dataclass
class Example:
  history: np.ndarray
  instruction: list
  target: int
  every_position: bool  # a target at every history item after the first (layout 'sequence')
  task: str
  group: int = -1  # examples of one group have nested histories (layout 'one_pass'); -1: none


def training_examples(cfg, ds: loader.Dataset, assets: Assets) -> tuple[list, dict]:
  """All training examples, in a fixed order, and the per-task counts."""
  built = tasks.build_tasks(ds, cfg.tasks, "train", tasks=task_list(cfg.sft.tasks))
  examples, counts = [], {}
  every = uses_sequence_layout(cfg, assets.mode)
  h = int(cfg.dataset.max_history)
  group_of = {}  # (user, first history position) -> group: its examples' histories are nested
  for name, ex in built.items():
    if name == "justforyou" and every:
      # One example per user: the last H+1 training items, every one after the first a target.
      rows = [s[-(h + 1):] for s in ds.splits.train_seqs if len(s) >= 2]
      instr = assets.tok.encode(ex.instruction[0]) if len(ex.instruction) else []
      for s in rows:
        examples.append(Example(s[:-1], instr, int(s[-1]), True, name))
      counts[name] = len(rows)
      continue
    ids = assets.tok.sp.encode(list(ex.instruction))
    for r in range(len(ex.target)):
      group = -1
      if cfg.sft.layout == "one_pass":
        key = (int(ex.user[r]), max(0, int(ex.position[r]) - h))
        group = group_of.setdefault(key, len(group_of))
      examples.append(Example(ex.history[r], ids[r], int(ex.target[r]), False, name, group))
    counts[name] = int(len(ex.target))
  if not examples:
    raise ValueError("no training examples for any task")
  check_prompt_lengths(examples, assets, int(cfg.sft.max_len))
  return examples, counts


def check_prompt_lengths(examples: list, assets: Assets, max_len: int) -> None:
  """A clear error before training when some examples' prompts exceed ``sft.max_len``, naming
  their tasks and the length that fits them all (``build_prompt`` would fail mid-run)."""
  hist = [int(np.count_nonzero(np.asarray(ex.history) != PAD_ITEM)) for ex in examples]
  lens = prompts.prompt_length(assets.spec, hist, [len(ex.instruction) for ex in examples],
                               len(assets.verb_ids or []))
  over = lens > max_len
  if over.any():
    by_task = collections.Counter(ex.task for ex, o in zip(examples, over) if o)
    where = ", ".join(f"{n} {t}" for t, n in sorted(by_task.items()))
    raise ValueError(f"{int(over.sum())} training prompts are longer than sft.max_len="
                     f"{max_len} ({where}); the longest has {int(lens.max())} tokens: raise "
                     f"sft.max_len to at least {int(lens.max())} or lower dataset.max_history")


def example_prompt(ex: Example, assets: Assets) -> dict:
  """The uncompacted prompt arrays of one training example (``prompts.build_prompt``)."""
  return prompts.build_prompt(assets.spec, ex.history, ex.instruction, ex.target,
                              ex.every_position, verb_ids=assets.verb_ids)


def pack_rows(cfg, mesh) -> int:
  """``make_batch``'s ``pack_multiple`` for ``cfg.sft.pack`` on ``mesh``: 0 (no packing), or
  the multiple packed row counts are rounded to (4, and a multiple of the data-parallel devices so
  the rows split over them like the batch does; few distinct counts, so few compilations)."""
  if not cfg.sft.pack:
    return 0
  return math.lcm(4, int(mesh.shape["data"]) * int(mesh.shape["fsdp"]))


def make_batch(examples: list, idx: np.ndarray, assets: Assets, cfg, rng,
               rows: slice = slice(None), pack_multiple: int = 0) -> dict:
  """The arrays of the global batch ``idx`` (example indices), for the rows ``rows`` only.

  Random draws (hard negatives) are made for the whole global batch from ``rng`` and then
  sliced, so a process that builds only its rows (``distributed.host_rows``) gets exactly the
  rows of the single-process batch. With ``pack_multiple`` > 0 (``pack_rows(cfg, mesh)``) the
  examples are packed several to a row (``prompts.pack``, R a multiple of it): every
  process packs the whole global batch the same way and keeps its block of the R packed rows
  and its ``rows`` of the per-example arrays.
  """
  h = int(cfg.dataset.max_history)
  max_q = h + 1 if cfg.sft.layout == "sequence" else 1
  num_hard = int(cfg.sft.hard_negatives)
  pack = pack_multiple > 0
  build = slice(None) if pack else rows
  rand = rng.random((len(idx), max_q, num_hard))[build] if num_hard else None
  chosen = [examples[i] for i in np.asarray(idx)[build]]
  arrays = prompts.stack([example_prompt(ex, assets) for ex in chosen])
  groups = trunk_len = None
  if cfg.sft.layout == "one_pass":
    if not pack:
      raise ValueError("sft.layout='one_pass' needs sft.pack=True (its rows are packed)")
    groups = np.array([ex.group for ex in chosen], np.int64)
    # The history is everything before the instruction, which ends at the first <|end|>.
    end = np.argmax(arrays["tokens"] == assets.tok.special[text.END], axis=1)
    trunk_len = end - np.array([len(ex.instruction) for ex in chosen], np.int64)
  out = prompts.compact(arrays, max_q * max(1, assets.spec.prefix_len), max_q, num_hard,
                        assets.prefix_ids, assets.bucket_table, assets.bucket_sizes, rand)
  if not pack:
    return out
  out = prompts.pack(out, math.lcm(int(pack_multiple), distributed.process_count()), groups,
                     trunk_len)
  packed_rows = distributed.host_rows(len(out["tokens"]))
  return {k: v[packed_rows] if k in PACKED_ROW_KEYS else v[rows] for k, v in out.items()}


def make_train_step(graphdef, tx, mu: float, tau: float, mesh, rules, state_sh, batch_sh,
                    negatives: str = "batch"):
  """Jitted ``step(state, batch, feats) -> (state, metrics)`` of L_NTP + mu L_ID.

  ``state`` ({'params', 'opt', 'step'}, shardings ``state_sh``) is donated; ``batch`` is a
  ``make_batch`` dict with shardings ``batch_sh``; ``feats`` [N, F] is replicated.
  """
  repl = parallel.replicated(mesh)

  def train_step(st, batch, feats):
    def loss_fn(p):
      return sigma.sft_loss(nnx.merge(graphdef, p), batch, feats, mu, tau, negatives)
    with parallel.activation_sharding(mesh, rules):
      (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt = tx.update(grads, st["opt"], st["params"])
    metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(params=optax.apply_updates(st["params"], updates), opt=opt,
                step=st["step"] + 1), metrics

  return jax.jit(train_step, in_shardings=(state_sh, batch_sh, repl),
                 out_shardings=(state_sh, repl), donate_argnums=0)


def init_backbone(cfg, params, workdir: str, spm_size: int, mesh) -> tuple[object, str]:
  """A fresh backbone's parameters started as ``sft.init`` says: (params, where they came from:
  'scratch', 'pretrain' or 'grounded').

  ``grounded`` copies the ground stage's text tower (DESIGN §2: the backbone is the text tower):
  its layers, norms and the first ``spm_size`` (SentencePiece) rows of the embedding. The SID
  token rows, and ``lm_head`` when the embeddings are not tied (grounding never trains it), keep
  their fresh initialisation, as do ProjFuse and ``q_proj`` outside the backbone. A tower of
  another shape is a ValueError naming both shapes.
  """
  init = str(cfg.sft.init)
  if init not in INITS:
    raise ValueError(f"sft.init must be one of {INITS}, got {init!r}")
  if init == "scratch":
    return params, "scratch"
  if init == "grounded":
    tower, _ = ground.load_tower_backbone(cfg, workdir, spm_size, mesh)
    where = wd.stage_dir(workdir, "ground")
    return backbone.copy_params(
        params, tower, source=f"the ground stage's text tower in {where}", keep_fresh=("lm_head",),
        hint=" (sft.init='grounded' needs the SFT backbone to have the text tower's shape: "
             "model.* as when the ground stage ran)"), "grounded"
  params, loaded = pretrain.load_into(params, workdir, cfg, spm_size,
                                      use="always" if init == "pretrain" else None)
  return params, "pretrain" if loaded else "scratch"


def init_state(cfg, assets: Assets, mesh, total_steps: int, workdir: str | None = None):
  """Model, optimizer and step, born sharded: (graphdef, state, state_shardings, tx, schedule).

  With ``workdir`` the backbone starts as ``sft.init`` says (``init_backbone``); without, fresh.
  """
  s = cfg.sft
  graphdef, params = build_model(cfg, assets, mesh)
  if workdir is not None:
    params["backbone"], source = init_backbone(cfg, params["backbone"], workdir,
                                               assets.tok.spm_size, mesh)
    logging.info("sft: the backbone starts from %s (sft.init=%r)", source, str(s.init))
  tx, schedule = optim.make_optimizer(s.learning_rate, s.warmup_steps, total_steps,
                                      s.weight_decay)
  state, state_sh = parallel.train_state(tx, params, mesh, cfg.axis_rules)
  return graphdef, state, state_sh, tx, schedule


def load_params(cfg, workdir: str, assets: Assets, mesh):
  """(graphdef, params, step) of the newest SFT checkpoint, restored sharded.

  The restore target is abstract (shapes, dtypes, shardings): nothing is initialised or
  compiled just to be overwritten, which keeps serving start-up short.
  """
  rules = cfg.axis_rules
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _new_model(cfg, assets)))
  shardings = parallel.state_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract, shardings)
  tx, _ = optim.make_optimizer(cfg.sft.learning_rate, cfg.sft.warmup_steps, 1,
                               cfg.sft.weight_decay)
  opt_sh = parallel.optimizer_shardings(tx, params, shardings, mesh)
  opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                     jax.eval_shape(tx.init, params), opt_sh)
  target = {"params": params, "opt": opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh))}
  with checkpoint.Checkpointer(wd.ckpt_dir(workdir, "sft"), max_to_keep=2) as ckpt:
    restored = ckpt.restore(target)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/sft/ckpt has no checkpoint: run the 'sft' stage first")
  step, state, _ = restored
  return graphdef, state["params"], step


@dataclasses.dataclass
class Setup:
  """One SFT run's pieces, built by `setup`: the stage trains with them, the benchmark times
  them, the multi-host check compares them across process counts."""
  assets: Assets
  examples: list
  counts: dict  # training examples per task
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: dict  # {'params', 'opt', 'step'}, sharded
  state_sh: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  feats: jax.Array  # [N, F] ProjFuse inputs, replicated
  train_step: callable  # make_train_step's jitted step
  order: object  # loader.index_batches or grouped_batches: step -> the global batch's examples
  steps_per_epoch: int
  total_steps: int
  pack_multiple: int
  cfg: object

  def host_batch(self, step: int) -> dict:
    """This process's rows of step ``step``'s batch (a pure function of seed and step)."""
    idx = self.order[step]
    return make_batch(self.examples, idx, self.assets, self.cfg,
                      np.random.default_rng([int(self.cfg.seed), step]),
                      distributed.host_rows(len(idx)), self.pack_multiple)

  def step(self, state, batch: dict):
    """One update on a ``host_batch``: (state, device metrics)."""
    return self.train_step(state, parallel.shard_batch(batch, self.mesh, self.cfg.axis_rules),
                           self.feats)


def setup(cfg, workdir: str, mesh, ds: loader.Dataset | None = None,
          total_steps: int | None = None) -> Setup:
  """Everything an SFT run on ``workdir``'s finished earlier stages needs, born sharded.

  Args:
    cfg: the experiment config (``cfg.sft`` above all).
    workdir: a work directory whose stages up to ``tokenize`` are done; the backbone starts from
      its pretrain stage's decoder when ``pretrain.use`` finds one.
    mesh: the device mesh.
    ds: the dataset, when the caller has loaded it already.
    total_steps: the run's length (it shapes the learning-rate schedule); default
      ``sft.steps``, or ``sft.epochs`` epochs when that is 0.
  """
  s = cfg.sft
  ds = ds if ds is not None else loader.load_dataset(cfg, workdir)
  assets = load_assets(cfg, workdir)
  examples, counts = training_examples(cfg, ds, assets)
  batch_size = int(s.batch_size)
  parallel.check_batch_divisible("sft.batch_size", batch_size, mesh)
  steps_per_epoch = loader.steps_per_epoch(len(examples), batch_size)
  if total_steps is None:
    total_steps = int(s.epochs * steps_per_epoch) if s.steps <= 0 else int(s.steps)
  graphdef, state, state_sh, tx, schedule = init_state(cfg, assets, mesh, total_steps, workdir)
  feats = parallel.put_replicated(np.asarray(assets.feats), mesh)
  packing = pack_rows(cfg, mesh)
  sample = make_batch(examples, np.arange(batch_size) % len(examples), assets, cfg,
                      np.random.default_rng(0), distributed.host_rows(batch_size), packing)
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim, cfg.axis_rules) for k, v in sample.items()}
  train_step = make_train_step(graphdef, tx, float(s.mu), float(s.tau), mesh, cfg.axis_rules,
                               state_sh, batch_sh, str(s.id_negatives))
  if s.layout == "one_pass":  # a group's examples side by side, so their histories are shared
    order = loader.grouped_batches([ex.group for ex in examples], batch_size, int(cfg.seed))
  else:
    order = loader.index_batches(len(examples), batch_size, int(cfg.seed))
  return Setup(assets, examples, counts, mesh, graphdef, state, state_sh, tx, schedule, feats,
               train_step, order, steps_per_epoch, int(total_steps), packing, cfg)
