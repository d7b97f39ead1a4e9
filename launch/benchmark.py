r"""Benchmarks of sigma_jax; one subcommand per benchmark, each prints ONE JSON line on stdout.

  python -m launch.benchmark decode                      # the full decode benchmark
  python -m launch.benchmark decode --items=20000 --batches=1,8 --reps=3
  python -m launch.benchmark sft_step --config=configs/beauty.py --workdir=runs/beauty \
      --timed_steps=10
  python -m launch.benchmark profile                     # MFU, eval users/s, time by part

Subcommands (add one by writing a `_<name>(argv) -> dict` function and listing it in
`SUBCOMMANDS`; flags are absl flags shared by all subcommands, each documented with the one
that reads it):

`matmul_layouts` (docs/PERFORMANCE.md "The backward pass"): forward and forward + backward
of the decoder's SwiGLU MLP and attention core on one packed SFT batch's shapes, in the layouts
the model uses (`backbone.dense`, grouped-query rows) and the einsum layouts it used before.

`sft_layouts` (docs/PERFORMANCE.md "One-pass SFT"): per-position vs one-pass SFT batches:
rows and real tokens per epoch, and step time; see `_sft_layouts`.

`sft_step` (docs/PERFORMANCE.md "SFT sequence packing"): one SFT training step, unpacked vs
packed (`sft.pack`), on a config's real data and a work directory's finished stages; see
`_sft_step`.

`profile` (docs/PERFORMANCE.md "Profile"): one run on synthetic data shaped like Beauty
(`--config`, default configs/beauty.py; `--profile_items` = 12,101 random SIDs; evaluation
prompts of `--history` = 20 items, SFT examples of 1..20; `sigma_jax/profile.py` builds them
and counts model FLOPs analytically). `matmul_flops_per_s` is the best dense f32 matmul rate of
`--matmul_sizes` (best of max(3, `--reps`) runs each); `mfu_sft` = the SFT step's model FLOP/s
(the config's batch, packed, the stage's jitted step) / it; `mfu_decode` = the decode
benchmark's prefill + constrained search (full SIDs, batch `generation.eval_batch`,
`--prompt_len` random prompt tokens) / it; `eval_users_per_s` = `generation.eval_batch` /
the median time of `Generator.recommend` on one batch (beam search, `<q>` pass, retrieval,
APF, host prompt building: the three-step generation as evaluation runs it);
`wall_time_s_by_part` times the SFT step's parts (host batch build, forward, forward +
backward, optimizer, whole step) and the evaluation batch's (host prompts and mask, prefill,
beam search, `<q>` pass, retrieval + fusion, the one `generate` program, the whole
`recommend`), each jitted on its own; every time is the median of `--reps` interleaved rounds.

`decode` (docs/PERFORMANCE.md "Decoding speed"). Two measurements:

1. Constrained beam search over the SID levels, on device vs on the host. A random-init decoder
   (`configs/base.py` backbone `--backbone`, vocabulary = `--text_vocab` text tokens + L·C SID
   tokens) and a synthetic catalogue of `--items` random distinct SIDs (L = `--levels`,
   C = `--codebook`). For each batch size in `--batches`, the same random prompts of
   `--prompt_len` tokens are prefilled into a KV cache once (jitted, not timed), then:
     (a) `beam.constrained_beam_search` (the jitted `lax.while_loop`, trie tables as device
         arrays) with a `step_fn` that runs the real backbone one token per beam, the beams
         sharing their prompt's KV cache, and returns the level's code logits only — the same
         step `generator.generate` runs — timed from the prefilled cache to
         `block_until_ready` of the result;
     (b) `reference.host_beam_search` with the SAME step_fn, parameters, prefilled cache and
         catalogue (a dict trie behind a Python `prefix -> allowed codes` callback, called per
         beam per step; one jitted model call per step; top-k on the host), timed the same
         way (its result is NumPy, so it is synchronous).
   Both are warmed up (compiled) first; the median of `--reps` (`--ref_reps` for (b)) runs is
   reported as recommendations/s = B / seconds (one recommendation = one prompt's K beams).
   `speedup` = (b) / (a) time at the largest batch; `speedup_by_batch` for every batch.
   `prefill_ms` (the same for both) is reported so end-to-end numbers can be derived.
   The prefill and the model step are identical in (a) and (b); only the search around the
   model differs. `agreement` is the fraction of (example, beam) rows whose SID the two
   searches agree on (near-ties in float32 can swap beams; it should be close to 1).
   `search_only` / `speedup_search_only`: the same two searches with the backbone replaced by
   a table lookup (`generate.testing.TableStep`, rows of W level-code logits, as the real step
   returns), i.e. the search machinery alone — constraint, softmax, top-k, beam bookkeeping
   and per-step dispatch. (Before 2026-12-05 the table rows had all V columns, the
   full-vocabulary step the decoder no longer runs.) It is NOT the headline: `speedup` is
   with the model.
   Every timed part (prefill, (a), (b) and the two search-only searches) runs once per round,
   in max(`--reps`, `--ref_reps`) interleaved rounds; each reported time is its median, so a
   noisy machine slows the parts alike.

2. Per-step constraint cost against catalogue size. For each size in `--constraint_items`,
   tables of that many random distinct SIDs are built in NumPy (`trie.build_tables`, its time
   reported as `build_s`) and put on the device; then ONLY the constraint part of one decode
   step is timed: the jitted per-level function of `beam._level_fns` (the one `beam_search`
   calls each step), node ids [B, K] -> (allowed mask [B, K, C], child node ids [B, K, C]),
   with B = `--constraint_batch`, K = `--num_beams`. Level 0 starts at the root, level 1
   (dense mask) at random allowed level-0 codes, levels >= 2 (CSR) at random existing nodes;
   every repetition gets fresh node ids. Median ms over `--constraint_reps` calls, each
   blocked on. `constraint_growth` = t(largest) / t(smallest) at the deepest CSR level (the
   only tables whose size grows with the catalogue; dense levels are [C0, C1] whatever N);
   `constraint_growth_mean` uses the mean over levels. `dispatch_ms` is the median time of an
   empty jitted call, the floor every per-call number includes.

3. Model FLOP utilisation, in the same run as 1. and 2.: `matmul_flops_per_s` is the best dense
   f32 matmul rate ([64·128, d]×[d, 4d], its transpose, 1024³, 2048³; best of 3 each);
   `mfu_decode` = the largest batch's analytic model FLOPs (`profile.decode_flops`: prefill
   plus L steps of B·K beam tokens) / (its prefill + jitted search time) / that rate, as the
   `profile` benchmark defines it. `search_only_speedup` repeats the largest batch's
   `search_only` speed-up at the top level, beside `constraint_growth`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags
import tqdm

_BACKBONE = flags.DEFINE_string("backbone", "small", "decode: backbone size in configs/base.py.")
_TEXT_VOCAB = flags.DEFINE_integer("text_vocab", 4000, "decode: text tokens before SID tokens.")
_LEVELS = flags.DEFINE_integer("levels", 3, "decode: SID levels L.")
_CODEBOOK = flags.DEFINE_integer("codebook", 256, "decode: codes per level C.")
_ITEMS = flags.DEFINE_integer("items", 100_000, "decode: catalogue size of the search benchmark.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 20, "decode: beams K.")
_BATCHES = flags.DEFINE_list("batches", ["1", "64"], "decode: batch sizes of the search benchmark.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "decode: prompt tokens (prefilled, untimed).")
_REPS = flags.DEFINE_integer("reps", 5, "decode: timed runs of the jitted search.")
_REF_REPS = flags.DEFINE_integer("ref_reps", 3, "decode: timed runs of the host search.")
_CONSTRAINT_ITEMS = flags.DEFINE_list("constraint_items", ["10000", "100000", "1000000"],
                                      "decode: catalogue sizes of the constraint benchmark.")
_CONSTRAINT_BATCH = flags.DEFINE_integer("constraint_batch", 64,
                                         "decode: batch B of the constraint benchmark.")
_CONSTRAINT_REPS = flags.DEFINE_integer("constraint_reps", 50,
                                        "decode: timed calls per level and catalogue size.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of parameters, prompts and catalogues.")


def _shared_flag(name: str, define: Callable, *args) -> Callable[[], Any]:
  """The value getter of absl flag ``name``, defined here unless another launch module imported
  into the same process (the tests import several) already defined it."""
  if name not in flags.FLAGS:
    define(name, *args)
  return lambda: flags.FLAGS[name].value


_CONFIG = _shared_flag("config", config_flags.DEFINE_config_file, None,
                       "sft_step: experiment config (configs/*.py).")
_WORKDIR = _shared_flag("workdir", flags.DEFINE_string, None, "sft_step: a work directory whose "
                        "stages before sft are done (its tokenizer, SIDs and item features).")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 20,
                                    "sft_step: timed training steps per layout.")
_EPOCH_BATCHES = flags.DEFINE_integer("epoch_batches", 0, "sft_layouts: batches built on the "
                                      "host to count rows and tokens (0: the whole epoch).")
_PROFILE_ITEMS = flags.DEFINE_integer("profile_items", 12_101,
                                      "profile: synthetic catalogue size (Beauty: 12,101).")
_HISTORY = flags.DEFINE_integer("history", 20, "profile: history items per evaluation prompt; "
                                "SFT examples draw 1..history.")
_MATMUL_SIZES = flags.DEFINE_list("matmul_sizes", [], "profile: MxKxN matmul shapes of the "
                                  "FLOP/s roofline; default [B*T, d] x [d, 4d], its transpose "
                                  "and 1024^3, 2048^3.")


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _median_s(fn: Callable[[], Any], reps: int) -> float:
  """Median wall seconds of `fn()` over `reps` runs, each blocked until its result is ready."""
  import jax
  times = []
  for _ in range(max(1, reps)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _time_sft_steps_alternately(runs: dict, batches: dict) -> dict:
  """{name: (median ms per step, the first step's loss)} of each SFT ``Setup``'s jitted step over
  its sharded ``batches[name]``: an untimed pass compiles every shape (packed row counts vary),
  then, from fresh states, the setups' steps are timed alternately batch by batch, so a noisy
  machine slows them alike."""
  import jax
  import numpy as np
  fresh = {k: jax.tree.map(np.asarray, r.state) for k, r in runs.items()}  # before donation
  first = {}
  for k, r in runs.items():
    state = r.state
    for b in batches[k]:
      state, m = r.train_step(state, b, r.feats)
      first.setdefault(k, float(m["loss"]))
  states = {k: jax.device_put(fresh[k], r.state_sh) for k, r in runs.items()}
  times = {k: [] for k in runs}
  for i in range(min(len(b) for b in batches.values())):
    for k, r in runs.items():
      t0 = time.perf_counter()
      states[k], m = r.train_step(states[k], batches[k][i], r.feats)
      jax.block_until_ready(m)
      times[k].append(time.perf_counter() - t0)
  return {k: (1e3 * statistics.median(times[k]), first[k]) for k in runs}


def machine_info() -> dict:
  """The devices, CPU count and library versions a result was measured with."""
  import flax
  import jax
  return dict(devices=[str(d) for d in jax.devices()], backend=jax.default_backend(),
              cpu_count=os.cpu_count(),
              cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else None,
              platform=platform.platform(), jax=jax.__version__, flax=flax.__version__,
              python=platform.python_version())


# ---------------------------------------------------------------------------------------------
# decode


def _search_bench(cfg, graphdef, params, sids, sizes, offsets, batch: int, rng) -> dict:
  """(a) jitted vs (b) host constrained beam search for one batch size; see module docstring."""
  import jax
  import numpy as np

  from sigma_jax import profile
  from sigma_jax.generate import beam, reference, testing, trie
  from sigma_jax.models import backbone as bb
  k, levels, p = _NUM_BEAMS.value, len(sizes), _PROMPT_LEN.value
  step = testing.DecoderStep(graphdef, token_offset=offsets, width=max(sizes), shared=True)
  tables = jax.device_put(trie.build_tables(sids, sizes))
  allowed_fn = reference.prefix_allowed_fn(sids)

  prompt = rng.integers(0, _TEXT_VOCAB.value, (batch, p)).astype(np.int32)  # [B, P]

  @jax.jit
  def prefill(params, tokens):
    # The prompt minus its last token; room for the L codes and a <q> pass after them.
    cache = bb.init_cache(cfg, tokens.shape[0], max_len=tokens.shape[1] + levels + 2)
    _, cache = bb.apply(graphdef, params, tokens, cache=cache)
    return cache

  start = jax.device_put(prompt[:, -1])  # [B]
  head = prompt[:, :-1]
  cache = jax.block_until_ready(prefill(params, head))  # compiles
  # As generator.generate: the beams share the prompt cache and keep their own tokens apart.
  state = (params, jax.jit(lambda c: c.truncate(p - 1))(cache))
  own = jax.jit(lambda c: bb.beam_cache(c, levels + 2))(state[1])

  def device_search():
    return beam.constrained_beam_search(step, state, start, own, tables, num_beams=k,
                                        token_offset=offsets, level_logits=True)

  def host_search():
    return reference.host_beam_search(step, state, prompt[:, -1], own, allowed_fn,
                                      num_beams=k, token_offset=offsets, codebook_sizes=sizes,
                                      level_logits=True)

  # The same two searches around a table-lookup step (no backbone): the search alone. Like the
  # real step it returns the level's code logits only ([B*K, W]).
  table = jax.device_put(rng.normal(size=(997, max(sizes))).astype(np.float32))
  rows = jax.device_put(np.zeros(batch, np.int32))  # [B] a one-int "cache" per row
  table_step = testing.TableStep()
  lite_device = lambda: beam.constrained_beam_search(
      table_step, table, start, rows, tables, num_beams=k, token_offset=offsets,
      level_logits=True)
  lite_host = lambda: reference.host_beam_search(
      table_step, table, prompt[:, -1], rows, allowed_fn, num_beams=k, token_offset=offsets,
      codebook_sizes=sizes, level_logits=True)

  t0 = time.perf_counter()
  out = jax.block_until_ready(device_search())
  compile_s = time.perf_counter() - t0
  ref_seqs, _, ref_valid = host_search()  # warm-up: compiles the step and the reorder
  jax.block_until_ready(lite_device())
  lite_host()
  # Interleaved rounds: each round runs every timed part once, so a noisy machine slows them
  # alike; the medians over max(--reps, --ref_reps) rounds.
  sec = profile.interleaved_medians(
      dict(prefill=lambda: prefill(params, head), device=device_search, host=host_search,
           lite_device=lite_device, lite_host=lite_host), max(_REPS.value, _REF_REPS.value))
  prefill_s, device_s, host_s = sec["prefill"], sec["device"], sec["host"]
  lite_device_s, lite_host_s = sec["lite_device"], sec["lite_host"]

  seqs, valid = np.asarray(out.sequences), np.asarray(out.valid)
  same = (valid == ref_valid) & np.all(seqs == ref_seqs, axis=-1)  # [B, K]
  catalogue = {tuple(s) for s in sids.tolist()}
  in_catalogue = all(tuple(s) in catalogue for s in seqs[valid].tolist())
  logging.info("batch %d: device %.1f ms, host %.1f ms; search only: device %.1f ms, host "
               "%.1f ms", batch, 1e3 * device_s, 1e3 * host_s, 1e3 * lite_device_s,
               1e3 * lite_host_s)
  return dict(batch=batch, device_ms=1e3 * device_s, host_ms=1e3 * host_s,
              device_recs_per_s=batch / device_s, host_recs_per_s=batch / host_s,
              speedup=host_s / device_s, prefill_ms=1e3 * prefill_s,
              device_compile_s=compile_s, agreement=float(same.mean()),
              valid_beams=float(valid.mean()), all_in_catalogue=bool(in_catalogue),
              search_only=dict(device_ms=1e3 * lite_device_s, host_ms=1e3 * lite_host_s,
                               speedup=lite_host_s / lite_device_s))


def _constraint_bench(n: int, sizes, rng) -> dict:
  """ms per decode step of the constraint alone, per level, for an n-item catalogue."""
  import jax
  import numpy as np

  from sigma_jax.generate import beam, testing, trie
  b, k, reps = _CONSTRAINT_BATCH.value, _NUM_BEAMS.value, _CONSTRAINT_REPS.value
  width = max(sizes)
  t0 = time.perf_counter()
  sids = testing.synthetic_sids(rng, n, sizes)
  host_tables = trie.build_tables(sids, sizes)
  build_s = time.perf_counter() - t0
  tables = jax.device_put(host_tables)

  # Nodes a beam can sit on before each level: the root; allowed level-0 codes; depth-l nodes.
  starts = [np.zeros(1, np.int32), np.flatnonzero(host_tables.mask0).astype(np.int32)]
  for i in range(len(sizes) - 2):
    ptr = host_tables.indptr[i]
    starts.append(np.flatnonzero(ptr[1:] > ptr[:-1]).astype(np.int32))  # nodes with children

  per_level = []
  for level in range(len(sizes)):
    fn = jax.jit(lambda tables, node, level=level: beam._level_fns(tables, b, width)[level](node))
    nodes = jax.device_put(rng.choice(starts[level], size=(reps + 1, b, k)))  # [R+1, B, K]
    allowed, child = jax.block_until_ready(fn(tables, nodes[reps]))  # compile
    if level == len(sizes) - 1:  # the sampled CSR nodes must have children to gather
      assert np.asarray(allowed).any(axis=-1).all()
    rows = iter(range(reps))
    per_level.append(1e3 * _median_s(lambda: fn(tables, nodes[next(rows)]), reps))
  logging.info("constraint %d items: %s ms per level", n, ["%.3f" % t for t in per_level])
  return dict(items=n, build_s=build_s, ms_per_level=per_level,
              ms_mean=float(np.mean(per_level)), ms_csr=per_level[-1])


def _decode(argv: Sequence[str]) -> dict:
  """The `decode` benchmark; see the module docstring. Returns the JSON-able result."""
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from sigma_jax.generate import testing
  levels, c = _LEVELS.value, _CODEBOOK.value
  if levels < 3:
    raise app.UsageError("--levels must be >= 3 so that a CSR level exists")
  sizes = (c,) * levels
  offsets = tuple(_TEXT_VOCAB.value + l * c for l in range(levels))
  rng = np.random.default_rng(_SEED.value)
  t_start = time.perf_counter()

  cfg = base.backbone(_BACKBONE.value)
  cfg.vocab_size = _TEXT_VOCAB.value + levels * c
  graphdef, params = testing.random_decoder(cfg, _SEED.value)
  sids = testing.synthetic_sids(rng, _ITEMS.value, sizes)
  search = [_search_bench(cfg, graphdef, params, sids, sizes, offsets, int(bs), rng)
            for bs in _BATCHES.value]

  empty = jax.jit(lambda x: x + 1)
  one = jnp.zeros((), jnp.int32)
  jax.block_until_ready(empty(one))
  dispatch_ms = 1e3 * _median_s(lambda: empty(one), 200)
  constraint = [_constraint_bench(int(n), sizes, rng) for n in _CONSTRAINT_ITEMS.value]

  # Model FLOP utilisation of the largest batch's decode (prefill + jitted search), against the
  # machine's dense matmul rate, measured in this same run (the profile benchmark's definition).
  from sigma_jax import profile
  largest = search[-1]
  d = int(cfg.d_model)
  rows = 64 * 128
  roof = profile.matmul_flops_per_s(
      [(rows, d, 4 * d), (rows, 4 * d, d), (1024, 1024, 1024), (2048, 2048, 2048)], 3)
  flops = profile.decode_flops(cfg, largest["batch"], _PROMPT_LEN.value, levels,
                               _NUM_BEAMS.value, c)
  decode_flops_per_s = flops["total"] / (1e-3 * (largest["prefill_ms"] + largest["device_ms"]))
  return dict(
      benchmark="decode",
      mfu_decode=decode_flops_per_s / roof["best"],
      decode_flops_per_s=decode_flops_per_s,
      decode_flops=flops,
      matmul_flops_per_s=roof["best"],
      matmul_flops_per_s_by_shape=roof["by_shape"],
      search_only_speedup=largest["search_only"]["speedup"],
      setting=dict(
          search="beam.constrained_beam_search (jitted lax.while_loop, real backbone step on "
                 "the shared prompt KV cache, level-code logits) vs "
                 "reference.host_beam_search (Python prefix->allowed callback per beam per "
                 "step, one jitted model call per step), "
                 "same step_fn, params, prefilled cache and catalogue; prefill untimed",
          backbone=_BACKBONE.value, vocab_size=int(cfg.vocab_size), levels=levels,
          codebook_size=c, items=_ITEMS.value, num_beams=_NUM_BEAMS.value,
          prompt_len=_PROMPT_LEN.value, reps=_REPS.value, ref_reps=_REF_REPS.value,
          constraint_batch=_CONSTRAINT_BATCH.value, constraint_reps=_CONSTRAINT_REPS.value,
          init="numpy random (fan-in normal)", seed=_SEED.value),
      machine=machine_info(),
      recs_per_s={f"batch_{r['batch']}": dict(device=r["device_recs_per_s"],
                                              host=r["host_recs_per_s"]) for r in search},
      speedup=largest["speedup"],
      speedup_by_batch={f"batch_{r['batch']}": r["speedup"] for r in search},
      speedup_search_only={f"batch_{r['batch']}": r["search_only"]["speedup"] for r in search},
      search=search,
      constraint_ms_per_step={str(r["items"]): r["ms_csr"] for r in constraint},
      constraint_growth=constraint[-1]["ms_csr"] / constraint[0]["ms_csr"],
      constraint_growth_mean=constraint[-1]["ms_mean"] / constraint[0]["ms_mean"],
      constraint=constraint,
      dispatch_ms=dispatch_ms,
      wall_s=time.perf_counter() - t_start)


def _sft_step(argv: Sequence[str]) -> dict:
  """The `sft_step` benchmark: one SFT step, unpacked vs packed (`sft.pack`).

  On the config's data and the workdir's stages, the first `--timed_steps` batches of the
  epoch's order are built once per layout (host time reported), each layout's jitted step runs
  over all of them once untimed (compiling every packed row count), then the two layouts' steps
  are timed alternately batch by batch from fresh states (median ms per step).
  `loss_rel_diff`: how far the packed first step's loss is from the unpacked one's (the same
  computation, so ~1e-6 or less).
  """
  del argv
  import numpy as np
  from sigma_jax import parallel
  from sigma_jax.data import loader
  from sigma_jax.train import sft
  cfg, workdir = _CONFIG(), _WORKDIR()
  if cfg is None or not workdir:
    raise app.UsageError("sft_step needs --config=configs/<name>.py and --workdir=<run>")
  t_start = time.perf_counter()
  ds = loader.load_dataset(cfg, workdir)
  mesh = parallel.make_mesh(cfg.mesh)
  rules = cfg.axis_rules
  bs = int(cfg.sft.batch_size)

  layouts, runs, batches = {}, {}, {}
  for pack in (False, True):
    cfg.sft.pack = pack
    # The sft stage's own setup: its examples, batches, negatives and jitted step.
    run = runs[pack] = sft.setup(cfg, workdir, mesh, ds=ds, total_steps=1000)
    steps = range(min(_TIMED_STEPS.value, len(run.order)))
    t0 = time.perf_counter()
    host = [run.host_batch(i) for i in steps]
    build_ms = 1e3 * (time.perf_counter() - t0) / len(host)
    batches[pack] = [parallel.shard_batch(b, mesh, rules) for b in host]
    rows = [len(b["tokens"]) for b in host]
    real = sum(int(b["attn_mask"].sum()) for b in host)
    layouts[pack] = dict(rows_per_batch=float(np.mean(rows)), host_build_ms=build_ms,
                         real_token_fraction=real / (sum(rows) * int(cfg.sft.max_len)))
  examples, rows_multiple, order = len(run.examples), run.pack_multiple, list(steps)
  timed = _time_sft_steps_alternately(runs, batches)
  plain, packed = ({"ms_per_step": timed[p][0], **layouts[p]} for p in (False, True))
  return dict(
      benchmark="sft_step",
      setting=dict(workdir=workdir, dataset=str(cfg.dataset.name), examples=examples,
                   layout=str(cfg.sft.layout), batch_size=bs,
                   max_len=int(cfg.sft.max_len), steps=len(order), row_multiple=rows_multiple),
      machine=machine_info(),
      unpacked=plain, packed=packed,
      speedup=plain["ms_per_step"] / packed["ms_per_step"],
      loss_rel_diff=abs(timed[True][1] - timed[False][1]) / abs(timed[False][1]),
      wall_s=time.perf_counter() - t_start)


def _sft_layouts(argv: Sequence[str]) -> dict:
  """The `sft_layouts` benchmark: per-position vs one-pass SFT (`sft.layout`), both packed.

  The two layouts train on the same examples with the same per-example loss
  (tests/integration/test_one_pass.py); one-pass puts a user's positions in one batch and
  computes their shared history once. Reported per layout: over one whole epoch (every batch
  built on the host, or the first `--epoch_batches`), rows and real (non-padding) tokens; then
  the median jitted step time over the first `--timed_steps` batches, the two layouts timed
  alternately batch by batch from fresh states after an untimed pass that compiles every shape.
  """
  del argv
  from sigma_jax import parallel
  from sigma_jax.data import loader
  from sigma_jax.train import sft
  cfg, workdir = _CONFIG(), _WORKDIR()
  if cfg is None or not workdir:
    raise app.UsageError("sft_layouts needs --config=configs/<name>.py and --workdir=<run>")
  t_start = time.perf_counter()
  ds = loader.load_dataset(cfg, workdir)
  mesh = parallel.make_mesh(cfg.mesh)
  cfg.sft.pack = True
  stats, runs, batches = {}, {}, {}
  for layout in ("per_position", "one_pass"):
    cfg.sft.layout = layout
    run = runs[layout] = sft.setup(cfg, workdir, mesh, ds=ds, total_steps=1000)
    epoch = run.steps_per_epoch
    n = epoch if _EPOCH_BATCHES.value <= 0 else min(_EPOCH_BATCHES.value, epoch)
    rows = tokens = 0
    t0 = time.perf_counter()
    for i in tqdm.tqdm(range(n), desc=f"{layout}: host batches", leave=False):
      b = run.host_batch(i)
      rows += len(b["tokens"])
      tokens += int(b["attn_mask"].sum())
    build_ms = 1e3 * (time.perf_counter() - t0) / n
    batches[layout] = [parallel.shard_batch(run.host_batch(i), mesh, cfg.axis_rules)
                       for i in range(min(_TIMED_STEPS.value, n))]
    stats[layout] = dict(examples=len(run.examples), batches=n, rows=rows, real_tokens=tokens,
                         rows_per_batch=rows / n, real_tokens_per_batch=tokens / n,
                         host_build_ms=build_ms)
  timed = _time_sft_steps_alternately(runs, batches)
  pp, op = ({"ms_per_step": timed[k][0], **stats[k]} for k in ("per_position", "one_pass"))
  return dict(
      benchmark="sft_layouts",
      setting=dict(workdir=workdir, dataset=str(cfg.dataset.name),
                   batch_size=int(cfg.sft.batch_size), max_len=int(cfg.sft.max_len),
                   timed_steps=len(batches["one_pass"])),
      machine=machine_info(), per_position=pp, one_pass=op,
      token_ratio=pp["real_tokens_per_batch"] / op["real_tokens_per_batch"],
      row_ratio=pp["rows_per_batch"] / op["rows_per_batch"],
      step_speedup=pp["ms_per_step"] / op["ms_per_step"],
      wall_s=time.perf_counter() - t_start)


def _profile(argv: Sequence[str]) -> dict:
  """The `profile` benchmark: MFU of SFT and decoding, evaluation users/s and where the time
  goes, in one run on synthetic data (module docstring)."""
  del argv
  import numpy as np

  from configs import beauty
  from sigma_jax import parallel, profile
  from sigma_jax.generate import testing
  from sigma_jax.train import sft
  t_start = time.perf_counter()
  cfg = _CONFIG() if _CONFIG() is not None else beauty.get_config()
  reps, seed, items, hist = _REPS.value, _SEED.value, _PROFILE_ITEMS.value, _HISTORY.value
  mesh = parallel.make_mesh(cfg.mesh)
  m = cfg.model
  rows = int(cfg.sft.batch_size) * int(cfg.sft.max_len)
  d = int(m.d_model)
  shapes = ([tuple(int(x) for x in s.split("x")) for s in _MATMUL_SIZES.value] or
            [(rows, d, 4 * d), (rows, 4 * d, d), (1024, 1024, 1024), (2048, 2048, 2048)])
  roof = profile.matmul_flops_per_s(shapes, max(3, reps))
  peak = roof["best"]
  logging.info("matmul roofline: %.3g FLOP/s", peak)

  assets = profile.synthetic_assets(cfg, items, seed)
  train_ex = profile.synthetic_examples(assets, int(cfg.sft.batch_size) * (reps + 1), hist, seed)
  s = profile.profile_sft(cfg, assets, mesh, train_ex, reps, seed)
  sft_flops_per_s = s["flops"]["train_step"] / s["seconds"]["train_step"]
  logging.info("sft step: %.1f ms, %.3g FLOP/s", 1e3 * s["seconds"]["train_step"],
               sft_flops_per_s)

  batch = int(cfg.generation.eval_batch)
  eval_ex = profile.synthetic_examples(assets, batch, hist, seed + 1, fixed_length=True)
  e = profile.profile_eval(cfg, assets, s["graphdef"], s["state"]["params"], eval_ex, reps)
  users_per_s = batch / e["seconds"]["recommend"]
  logging.info("eval batch: %.1f ms, %.1f users/s", 1e3 * e["seconds"]["recommend"], users_per_s)

  levels, c = int(cfg.tokenizer.levels), int(cfg.tokenizer.codebook_size)
  dm = sft.model_config(cfg, assets)
  sizes = (c,) * levels
  offsets = tuple(int(assets.tok.sid_token(l, 0)) for l in range(levels))
  sids = testing.synthetic_sids(np.random.default_rng(seed), items, sizes)
  k = int(cfg.generation.num_beams)
  dec = profile.profile_decode(dm, sids, sizes, offsets, batch, _PROMPT_LEN.value, k, reps,
                               seed)
  decode_s = dec["seconds"]["prefill"] + dec["seconds"]["search"]
  decode_flops_per_s = dec["flops"]["total"] / decode_s

  return dict(
      benchmark="profile",
      setting=dict(
          config="configs/beauty.py" if _CONFIG() is None else "--config",
          backbone=str(m.size), d_model=d, layers=int(m.num_layers),
          vocab_size=int(dm.vocab_size), items=items, levels=levels, codebook_size=c,
          prefix_len=int(cfg.tokenizer.prefix_len), num_beams=k, history=hist,
          sft_batch=s["batch_size"], sft_packed_rows=s["rows"], sft_max_len=int(cfg.sft.max_len),
          sft_layout="per_position (synthetic: histories of 1..history items)",
          id_negatives=str(cfg.sft.id_negatives), eval_batch=batch,
          decode_prompt_len=_PROMPT_LEN.value, reps=reps, seed=seed,
          data="synthetic: random SIDs, unit features, hashed instruction words, random "
               "histories; random-init (SFT) and briefly trained (eval) weights",
          flops="analytic model FLOPs (sigma_jax/profile.py): real tokens, causal attention, "
                "train step = 3 x forward"),
      machine=machine_info(),
      matmul_flops_per_s=peak,
      matmul_flops_per_s_by_shape=roof["by_shape"],
      mfu_sft=sft_flops_per_s / peak,
      sft_flops_per_s=sft_flops_per_s,
      sft_flops_per_step=s["flops"]["train_step"],
      sft_forward_flops_by_part=s["flops"]["forward"],
      sft_tokens_per_s=s["flops"]["tokens"] / s["seconds"]["train_step"],
      mfu_decode=decode_flops_per_s / peak,
      decode_flops_per_s=decode_flops_per_s,
      decode_flops=dec["flops"],
      mfu_eval=e["flops"]["total"] / e["seconds"]["generate"] / peak,
      eval_flops=e["flops"],
      eval_users_per_s=users_per_s,
      eval_parts_agree=e["parts_agree"],
      wall_time_s_by_part=dict(sft=s["seconds"], eval=e["seconds"], decode=dec["seconds"]),
      wall_s=time.perf_counter() - t_start)


def _matmul_layouts(argv: Sequence[str]) -> dict:
  """The `matmul_layouts` benchmark: forward and forward + backward of the decoder's MLP and
  attention core in the layout the model uses now and the einsum layout it used before
  (docs/PERFORMANCE.md "The backward pass"), on one packed SFT batch's shapes."""
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import beauty
  from sigma_jax import profile
  from sigma_jax.models import backbone
  cfg = _CONFIG() if _CONFIG() is not None else beauty.get_config()
  m = cfg.model
  b, t, d, f = int(cfg.sft.batch_size) // 2, int(cfg.sft.max_len), int(m.d_model), int(m.mlp_dim)
  kv, dh = int(m.num_kv_heads), int(m.head_dim)
  g = int(m.num_heads) // kv
  r = np.random.default_rng(_SEED.value)
  arr = lambda *shape: jnp.asarray(r.normal(size=shape) * 0.05, jnp.float32)
  x, ws = arr(b, t, d), (arr(d, f), arr(d, f), arr(f, d))
  q, k, v = arr(b, t, kv, g, dh), arr(b, t, kv, dh), arr(b, t, kv, dh)
  causal = jnp.tril(jnp.ones((t, t), bool))

  def mlp_einsum(x, w1, w2, w3):  # products over [B, T, D]
    return (jax.nn.silu(x @ w1) * (x @ w2)) @ w3

  def mlp_dense(x, w1, w2, w3):  # backbone.MLP's products
    return backbone.dense(jax.nn.silu(backbone.dense(x, w1)) * backbone.dense(x, w2), w3)

  def attend(scores, v_fn):
    return v_fn(jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1))

  def attn_einsum(q, k, v):  # (g, t) as separate free axes
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * dh ** -0.5
    return attend(s, lambda p: jnp.einsum("bkgts,bskd->btkgd", p, v))

  def attn_grouped(q, k, v):  # backbone.Attention's layout: [G·T, Dh] rows per kv head
    s = backbone.grouped_scores(q, k) * dh ** -0.5
    return attend(s, lambda p: backbone.grouped_values(p, v))

  fns, agree = {}, {}
  for name, fn, args in (("mlp_einsum", mlp_einsum, (x,) + ws), ("mlp_dense", mlp_dense, (x,) + ws),
                         ("attention_einsum", attn_einsum, (q, k, v)),
                         ("attention_grouped", attn_grouped, (q, k, v))):
    loss = lambda *a, fn=fn: jnp.sum(fn(*a) ** 2)
    fwd = jax.jit(loss)
    bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    jax.block_until_ready((fwd(*args), bwd(*args)))  # compile outside the timing
    fns[f"{name}/forward"] = lambda fwd=fwd, args=args: fwd(*args)
    fns[f"{name}/forward_backward"] = lambda bwd=bwd, args=args: bwd(*args)
    agree[name] = np.asarray(fn(*args))
  seconds = profile.interleaved_medians(fns, max(5, _REPS.value))
  return dict(
      benchmark="matmul_layouts", machine=machine_info(),
      setting=dict(config="configs/beauty.py" if _CONFIG() is None else "--config", rows=b,
                   length=t, d_model=d, mlp_dim=f, kv_heads=kv, groups=g, head_dim=dh,
                   reps=max(5, _REPS.value), timing="medians of interleaved rounds"),
      ms={name: 1e3 * sec for name, sec in seconds.items()},
      layouts_agree=bool(np.allclose(agree["mlp_einsum"], agree["mlp_dense"], atol=1e-5) and
                         np.allclose(agree["attention_einsum"], agree["attention_grouped"],
                                     atol=1e-5)))


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], dict]] = {"decode": _decode,
                                                           "matmul_layouts": _matmul_layouts,
                                                           "profile": _profile,
                                                           "sft_layouts": _sft_layouts,
                                                           "sft_step": _sft_step}


def main(argv):
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m launch.benchmark {{{'|'.join(SUBCOMMANDS)}}} "
                         f"[--flags]; got {argv[1:]}")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments: {argv[2:]}")
  logging.getLogger().setLevel(logging.INFO)
  result = SUBCOMMANDS[argv[1]](argv[2:])
  sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
