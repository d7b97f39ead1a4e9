"""Model FLOPs and timed parts of an SFT step and of an evaluation batch (issue 21).

The library side of ``python -m launch.benchmark profile``: a synthetic catalogue and training
examples shaped like a real run (`synthetic_assets`, `synthetic_examples`), analytic model FLOP
counts (`decoder_matmul_params`, `sft_step_flops`, `decode_flops`, `generate_flops`), a dense
matmul roofline (`matmul_flops_per_s`) and the three-step generation split into separately
jitted parts (`GenerateParts`) so that each part can be timed.

FLOPs are counted the usual way (a multiply-add is 2 FLOPs), over the work the model must do:
real (non-padding) tokens only, causal attention over the keys a token may see (the segment it
belongs to in a packed row, the prompt and its own beam tokens when decoding), and nothing for
element-wise ops, norms, softmaxes, top-k or gathers. A training step is 3x its forward pass
(backward = 2x forward). Padding, masked attention entries and the padded bucket slots the
kernels also compute are not model FLOPs, so MFU here is a lower bound of the hardware
utilisation.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_jax.data import prompts, tasks as tasks_lib
from sigma_jax.generate import beam, fusion, generator, testing
from sigma_jax.models import backbone as bb
from sigma_jax.models import rq
from sigma_jax.models import sigma as sigma_model
from sigma_jax.train import sft


# ---------------------------------------------------------------------------------------------
# Synthetic run


def synthetic_assets(cfg, items: int, seed: int, feat_dim: int = 128) -> sft.Assets:
  """`sft.Assets` of a synthetic catalogue, shaped by ``cfg`` as `sft.load_assets` would be.

  ``items`` random distinct SIDs of ``cfg.tokenizer.levels`` levels of
  ``cfg.tokenizer.codebook_size`` codes (no de-duplication level), their prefix buckets,
  random unit features [N, feat_dim] (a real run has 2 x 64: v_ID and the grounded text
  embedding) and a `testing.SyntheticTokenizer` of ``cfg.text.vocab_size`` text ids.
  """
  if cfg.generation.mode != "sigma":
    raise ValueError(f"the synthetic assets are for generation.mode='sigma', got "
                     f"{cfg.generation.mode!r}")
  rng = np.random.default_rng(seed)
  levels, size = int(cfg.tokenizer.levels), int(cfg.tokenizer.codebook_size)
  prefix_len = int(cfg.tokenizer.prefix_len)
  sids = testing.synthetic_sids(rng, items, (size,) * levels)
  tok = testing.SyntheticTokenizer(int(cfg.text.vocab_size), levels, size)
  prefix_ids, table, sizes, _ = rq.prefix_buckets(sids, prefix_len)
  feats = rng.normal(size=(items, feat_dim)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  spec = prompts.PromptSpec(tok=tok, item_tokens=prompts.item_token_table(tok, sids, prefix_len),
                            max_len=int(cfg.sft.max_len))
  return sft.Assets(tok, spec, feats, sids, prefix_ids, table, sizes,
                    tok.encode(prompts.HISTORY_VERB), "sigma")


def synthetic_examples(assets: sft.Assets, n: int, max_history: int, seed: int,
                       fixed_length: bool = False) -> list:
  """``n`` JustForYou examples (one per history position, `sft.Example`): random histories of
  1..``max_history`` distinct items (exactly ``max_history`` with ``fixed_length``), random
  targets, the task's phrasings in turn."""
  rng = np.random.default_rng(seed)
  templates = [assets.tok.encode(t) for t in tasks_lib.TEMPLATES["justforyou"]]
  items = len(assets.sids)
  out = []
  for i in range(n):
    h = max_history if fixed_length else int(rng.integers(1, max_history + 1))
    picked = rng.choice(items, size=h + 1, replace=False).astype(np.int32)
    out.append(sft.Example(picked[:-1], templates[i % len(templates)], int(picked[-1]), False,
                           "justforyou"))
  return out


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs


def decoder_matmul_params(m) -> int:
  """Weights a backbone token is multiplied by: per layer q, k, v, o projections and the
  SwiGLU gate, up and down (embedding lookup and output logits are counted apart)."""
  d, h, kv, dh, f = (int(m.d_model), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim),
                     int(m.mlp_dim))
  return int(m.num_layers) * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f)


def attention_flops(m, keys) -> float:
  """Forward FLOPs of attention scores and weighted values (QK^T and AV: 4 · H · Dh per key)
  for tokens attending to ``keys`` keys each (summed), over all layers."""
  return 4.0 * int(m.num_layers) * int(m.num_heads) * int(m.head_dim) * float(np.sum(keys))


def _causal_keys(lengths) -> float:
  """Keys seen by the tokens of causal sequences of these lengths: sum L(L+1)/2."""
  lengths = np.asarray(lengths, np.float64)
  return float(np.sum(lengths * (lengths + 1) / 2))


def projfuse_flops(feat_dim: int, hidden: int, d_model: int) -> float:
  """Forward FLOPs of one ProjFuse pass (F -> hidden -> D)."""
  return 2.0 * (feat_dim * hidden + hidden * d_model)


def sft_step_flops(cfg, m, batch_unpacked: dict, num_items: int, feat_dim: int) -> dict:
  """Model FLOPs of one SFT training step (3 x forward) on a batch.

  Args:
    cfg: the experiment config (`sft.projfuse_hidden`, `sft.id_negatives`).
    m: the backbone config (`sft.model_config`).
    batch_unpacked: the batch before packing (`prompts.compact`'s arrays: attn_mask,
      inject_items [B, T]; ntp_w [B, P]; q_item [B, Q]).
    num_items: N, the catalogue (catalogue L_ID negatives run ProjFuse over all N items).
    feat_dim: F.

  Returns:
    {"forward": per part forward FLOPs, "train_step": 3 x their sum, "tokens": real tokens}.
  """
  d, v, hid = int(m.d_model), int(m.vocab_size), int(cfg.sft.projfuse_hidden)
  lengths = batch_unpacked["attn_mask"].sum(axis=1)
  tokens = float(lengths.sum())
  injected = float((batch_unpacked["inject_items"] >= 0).sum())
  ntp = float(batch_unpacked["ntp_w"].sum())
  queries = float((batch_unpacked["q_item"] >= 0).sum())
  pf = projfuse_flops(feat_dim, hid, d)
  fwd = {
      "backbone_matmul": 2.0 * decoder_matmul_params(m) * tokens,
      "attention": attention_flops(m, [_causal_keys(lengths)]),
      "projfuse_inject": pf * injected,
      "ntp_logits": 2.0 * d * v * ntp,
      "q_proj": 2.0 * d * d * queries,
  }
  if cfg.sft.id_negatives == "catalogue":
    fwd["id_keys"] = pf * num_items
    fwd["id_scores"] = 2.0 * d * num_items * queries
  else:  # in-batch + hard negatives
    per_q = queries + int(cfg.sft.hard_negatives)
    fwd["id_keys"] = pf * queries * (1 + int(cfg.sft.hard_negatives))
    fwd["id_scores"] = 2.0 * d * queries * per_q
  return dict(forward=fwd, train_step=3.0 * sum(fwd.values()), tokens=tokens)


def decode_flops(m, batch: int, prompt_len: int, levels: int, num_beams: int,
                 width: int) -> dict:
  """Model FLOPs of the decode benchmark's search: prefill of ``prompt_len`` - 1 tokens per
  prompt, then ``levels`` steps of B·K beam tokens, each attending to the prompt and its beam's
  earlier tokens, with the level's ``width`` code logits."""
  pm, d = decoder_matmul_params(m), int(m.d_model)
  p = prompt_len - 1
  prefill = batch * (2.0 * pm * p + attention_flops(m, [_causal_keys([p])]))
  rows = batch * num_beams
  steps = sum(rows * (2.0 * pm + attention_flops(m, [p + l + 1]) + 2.0 * d * width)
              for l in range(levels))
  return dict(prefill=prefill, search=steps, total=prefill + steps)


def generate_flops(cfg, m, prompt_lengths, history_items: int, num_items: int,
                   num_prefixes: int, feat_dim: int) -> dict:
  """Model FLOPs of `generator.generate` (mode sigma) on one batch.

  Prefill of each prompt but its last token, with one ProjFuse pass per history item (its
  <item> vector); ``prefix_len`` search steps of B·K beam tokens with the level's code logits;
  the `<q>` pass (two tokens per beam, then q_proj); bucket retrieval against the average
  bucket (N / P items) per beam. The item keys are computed once per catalogue, not per batch,
  and are not counted; APF's softmaxes and the top-N are not matmuls.

  Args:
    cfg: the experiment config; m: the backbone config.
    prompt_lengths: [B] real tokens per prompt (ending with <|end|> <|start|>).
    history_items: <item> positions in the batch.
    num_items, num_prefixes: N and P.
    feat_dim: F.
  """
  pm, d = decoder_matmul_params(m), int(m.d_model)
  k, ell = int(cfg.generation.num_beams), int(cfg.tokenizer.prefix_len)
  width = int(cfg.tokenizer.codebook_size)
  n = np.asarray(prompt_lengths, np.float64) - 1  # prefilled tokens per prompt
  b = len(n)
  prefill = (2.0 * pm * n.sum() + attention_flops(m, [_causal_keys(n)]) +
             projfuse_flops(feat_dim, int(cfg.sft.projfuse_hidden), d) * history_items)
  # Step l: each beam's token sees the prompt, the start token and l codes.
  search = sum(k * (2.0 * pm * b + attention_flops(m, n + l + 1) + 2.0 * d * width * b)
               for l in range(ell))
  q_pass = k * (2.0 * pm * 2 * b + attention_flops(m, n + ell + 1) +
                attention_flops(m, n + ell + 2) + 2.0 * d * d * b)
  retrieval = 2.0 * d * b * k * num_items / max(1, num_prefixes)
  return dict(prefill=prefill, search=search, q_pass=q_pass, retrieval=retrieval,
              total=prefill + search + q_pass + retrieval)


# ---------------------------------------------------------------------------------------------
# Timing


def median_s(fn, reps: int) -> float:
  """Median wall seconds of ``fn()`` over ``reps`` runs, each blocked until its result is ready."""
  times = []
  for _ in range(max(1, reps)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def interleaved_medians(fns: dict, reps: int) -> dict:
  """Median wall seconds of each of ``fns`` (name -> zero-argument callable), each result
  blocked on, over ``reps`` rounds that call every function once in turn: on a machine shared
  with other jobs, the parts then see the same contention."""
  times = {name: [] for name in fns}
  for _ in range(max(1, reps)):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def matmul_flops_per_s(shapes, reps: int) -> dict:
  """Dense float32 matmul FLOP/s of this machine: for each (m, k, n) in ``shapes`` a jitted
  [m, k] x [k, n] product, compiled first, the best (shortest) of ``reps`` runs.

  Returns:
    {"best": the highest FLOP/s, "by_shape": {"MxKxN": FLOP/s}}.
  """
  mm = jax.jit(jnp.matmul)
  by_shape = {}
  rng = np.random.default_rng(0)
  for m_, k_, n_ in shapes:
    a = jax.device_put(rng.normal(size=(m_, k_)).astype(np.float32))
    b = jax.device_put(rng.normal(size=(k_, n_)).astype(np.float32))
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(max(1, reps)):
      t0 = time.perf_counter()
      jax.block_until_ready(mm(a, b))
      best = min(best, time.perf_counter() - t0)
    by_shape[f"{m_}x{k_}x{n_}"] = 2.0 * m_ * k_ * n_ / best
  return dict(best=max(by_shape.values()), by_shape=by_shape)


def profile_sft(cfg, assets: sft.Assets, mesh, examples: list, reps: int, seed: int) -> dict:
  """Times an SFT step and its parts on synthetic examples.

  Builds ``reps`` + 1 batches of ``cfg.sft.batch_size`` examples the way the stage does
  (`sft.make_batch`, packed when ``sft.pack``; host time per batch), then on the first batch:
  the whole jitted step (`sft.make_train_step`, as the stage runs it), the forward pass
  (loss only), forward + backward (`value_and_grad`) and the optimizer update (AdamW on those
  gradients), each jitted on its own, compiled first, median of ``reps`` runs.

  Returns:
    {"seconds": {part: s}, "flops": `sft_step_flops` of the timed batch, "state": the state
    after the timed steps, "graphdef", "rows": packed rows, "batch_size"}.
  """
  import optax
  from sigma_jax import parallel
  rules = cfg.axis_rules
  bs = int(cfg.sft.batch_size)
  graphdef, state, state_sh, tx, _ = sft.init_state(cfg, assets, mesh, total_steps=1000)
  feats = parallel.put_replicated(np.asarray(assets.feats), mesh)
  packing = sft.pack_rows(cfg, mesh)
  rng = np.random.default_rng(seed)
  order = [np.arange(i * bs, (i + 1) * bs) % len(examples) for i in range(reps + 1)]
  build = []
  for idx in order:
    t0 = time.perf_counter()
    batch = sft.make_batch(examples, idx, assets, cfg, rng, slice(None), packing)
    build.append(time.perf_counter() - t0)
    if len(build) == 1:
      first = batch
  unpacked = sft.make_batch(examples, order[0], assets, cfg, np.random.default_rng(seed))
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim, rules) for k, v in first.items()}
  step = sft.make_train_step(graphdef, tx, float(cfg.sft.mu), float(cfg.sft.tau), mesh, rules,
                             state_sh, batch_sh, str(cfg.sft.id_negatives))
  dev = parallel.shard_batch(first, mesh, rules)
  mu, tau, neg = float(cfg.sft.mu), float(cfg.sft.tau), str(cfg.sft.id_negatives)

  def loss_fn(p, batch):
    with parallel.activation_sharding(mesh, rules):
      return sigma_model.sft_loss(nnx.merge(graphdef, p), batch, feats, mu, tau, neg)

  forward = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

  @jax.jit
  def optimizer(grads, opt, params):
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  state, _ = step(state, dev, feats)  # compiles
  params, opt = state["params"], state["opt"]
  _, grads = jax.block_until_ready(fwd_bwd(params, dev))
  jax.block_until_ready(forward(params, dev))
  jax.block_until_ready(optimizer(grads, opt, params))
  live = {"state": state}

  def train_step():
    live["state"], metrics = step(live["state"], dev, feats)  # donates the old state
    return metrics

  # The parts read a copy of the parameters: the train step donates the state's buffers.
  params, opt = jax.tree.map(jnp.copy, (params, opt))
  seconds = interleaved_medians(dict(
      train_step=train_step,
      forward=lambda: forward(params, dev),
      forward_backward=lambda: fwd_bwd(params, dev),
      optimizer=lambda: optimizer(grads, opt, params)), reps)
  seconds["host_batch_build"] = float(np.median(build))
  state = live["state"]
  flops = sft_step_flops(cfg, sft.model_config(cfg, assets), unpacked, len(assets.sids),
                         assets.feats.shape[1])
  return dict(seconds=seconds, flops=flops, state=state, graphdef=graphdef,
              rows=int(len(first["tokens"])), batch_size=bs)


def profile_eval(cfg, assets: sft.Assets, graphdef, params, examples: list, reps: int) -> dict:
  """Times one evaluation batch (``len(examples)`` users) through `Generator.recommend` as
  `eval.evaluate.rank_examples` runs it (JustForYou: no instruction constraint, history items
  excluded), the one jitted `generate` program alone, its host side (prompt arrays and the
  allowed mask) and its four parts (`GenerateParts`); medians of ``reps`` runs after a
  compiling one.

  Returns:
    {"seconds": {part: s}, "flops": `generate_flops`, "users": B, "parts_agree": whether the
    chained parts rank the same items as `generate`}.
  """
  gen = generator.Generator(cfg, assets, graphdef, params)
  hist = [ex.history for ex in examples]
  instr = [ex.instruction for ex in examples]
  n = len(assets.sids)
  tau = float(cfg.generation.apf_tau)

  def host():
    arrays = gen.prompts(hist, instr)
    mask = np.ones((len(hist), n), bool)
    for r, h in enumerate(hist):
      mask[r, h] = not gen.exclude_history
    return arrays, mask

  ranked = gen.recommend(hist, instr)  # compiles
  arrays, mask = host()
  arrays = {k: jax.device_put(v) for k, v in arrays.items()}
  mask = jax.device_put(mask)

  def whole():
    return generator.generate(gen.graphdef, gen.params, gen.item_keys, arrays["tokens"],
                              arrays["inject_items"], arrays["attn_mask"], gen.feats,
                              gen.full_tables, gen.bucket_table, mask, tau, spec=gen.spec)

  jax.block_until_ready(whole())
  parts = GenerateParts(gen)
  chained = parts.run(arrays, mask, tau)["rank"]
  agree = bool(np.array_equal(np.asarray(chained.items), np.asarray(ranked.items)))
  seconds = interleaved_medians(dict(
      recommend=lambda: gen.recommend(hist, instr), host_prompts_and_mask=host,
      generate=whole, **parts.fns(arrays, mask, tau)), reps)
  lengths = np.asarray(arrays["attn_mask"]).sum(axis=1)
  flops = generate_flops(cfg, sft.model_config(cfg, assets), lengths,
                         int(sum(len(h) for h in hist)), n, len(assets.bucket_sizes),
                         assets.feats.shape[1])
  return dict(seconds=seconds, flops=flops, users=len(hist), parts_agree=agree)


def profile_decode(m, sids: np.ndarray, sizes, offsets, batch: int, prompt_len: int,
                   num_beams: int, reps: int, seed: int) -> dict:
  """The decode benchmark's jitted search (`launch.benchmark decode`, (a)) with its prefill
  timed too: a random-init decoder of config ``m``, ``batch`` random prompts of ``prompt_len``
  tokens, constrained beam search over the full SIDs ``sids`` (one level per step, level-code
  logits, beams sharing the prompt cache). Medians of ``reps`` runs after a compiling one.

  Returns:
    {"seconds": {"prefill", "search"}, "flops": `decode_flops`}.
  """
  from sigma_jax.generate import trie
  rng = np.random.default_rng(seed)
  levels = len(sizes)
  graphdef, params = testing.random_decoder(m, seed)
  step = testing.DecoderStep(graphdef, token_offset=offsets, width=max(sizes), shared=True)
  tables = jax.device_put(trie.build_tables(sids, sizes))
  prompt = jax.device_put(rng.integers(0, int(offsets[0]), (batch, prompt_len)).astype(np.int32))

  @jax.jit
  def prefill(params, tokens):
    cache = bb.init_cache(m, tokens.shape[0], max_len=tokens.shape[1] + levels + 2)
    _, cache = bb.apply(graphdef, params, tokens, cache=cache)
    return cache.truncate(tokens.shape[1])

  @jax.jit
  def search(params, cache, start):
    own = bb.beam_cache(cache, levels + 2)
    return beam.constrained_beam_search(step, (params, cache), start, own, tables,
                                        num_beams=num_beams, token_offset=offsets,
                                        level_logits=True)

  head, start = prompt[:, :-1], prompt[:, -1]
  cache = jax.block_until_ready(prefill(params, head))
  jax.block_until_ready(search(params, cache, start))
  seconds = interleaved_medians(dict(prefill=lambda: prefill(params, head),
                                     search=lambda: search(params, cache, start)), reps)
  flops = decode_flops(m, batch, prompt_len, levels, num_beams, max(sizes))
  return dict(seconds=seconds, flops=flops)


@dataclasses.dataclass
class GenerateParts:
  """`generator.generate` (mode sigma) as four separately jitted parts, to time each:
  ``prefill`` (prompt into the KV cache), ``search`` (constrained beam search over the SID
  prefix), ``q_pass`` (`<q>` after each prefix) and ``rank`` (bucket retrieval and APF).

  They repeat `generate`'s code; `run` chains them, and the profile checks that the chain
  returns `generate`'s items.
  """
  gen: generator.Generator

  def __post_init__(self):
    if self.gen.spec.mode != "sigma":
      raise ValueError(f"GenerateParts is for mode sigma, got {self.gen.spec.mode!r}")

  def run(self, arrays: dict, mask, tau: float) -> dict:
    """Each part's output for one batch of put prompt arrays; the last is a `fusion.Ranked`."""
    g = self.gen
    cache, start = _prefill(g.graphdef, g.params, arrays["tokens"], arrays["inject_items"],
                            arrays["attn_mask"], g.feats, levels=len(g.spec.token_offset))
    res = _search(g.graphdef, g.params, cache, start, g.full_tables, spec=g.spec)
    q = _q_pass(g.graphdef, g.params, cache, res, spec=g.spec)
    ranked = _rank(q, res.scores, res.valid, res.prefix_ids, g.bucket_table, g.item_keys, mask,
                   tau, spec=g.spec)
    return dict(prefill=(cache, start), search=res, q_pass=q, rank=ranked)

  def fns(self, arrays: dict, mask, tau: float) -> dict:
    """Each part as a zero-argument callable on its own inputs (computed here, every part
    compiled): {"prefill", "beam_search", "q_pass", "retrieval_fusion"}."""
    g, levels = self.gen, len(self.gen.spec.token_offset)
    out = self.run(arrays, mask, tau)  # compiles every part
    jax.block_until_ready(out)
    (cache, start), res, q = out["prefill"], out["search"], out["q_pass"]
    return {
        "prefill": lambda: _prefill(g.graphdef, g.params, arrays["tokens"],
                                    arrays["inject_items"], arrays["attn_mask"], g.feats,
                                    levels=levels),
        "beam_search": lambda: _search(g.graphdef, g.params, cache, start, g.full_tables,
                                       spec=g.spec),
        "q_pass": lambda: _q_pass(g.graphdef, g.params, cache, res, spec=g.spec),
        "retrieval_fusion": lambda: _rank(q, res.scores, res.valid, res.prefix_ids,
                                          g.bucket_table, g.item_keys, mask, tau, spec=g.spec),
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "levels"))
def _prefill(graphdef, params, tokens, inject_items, attn_mask, feats, *, levels: int):
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  length = jnp.sum(attn_mask, axis=1)  # [B]
  last = jnp.arange(t)[None, :] == (length - 1)[:, None]
  cache = model.backbone.init_cache(b, generator._cache_len(t, levels))
  _, cache = model.hidden(tokens, inject_items, attn_mask & ~last, feats, cache=cache)
  start = jnp.take_along_axis(tokens, (length - 1)[:, None], axis=1)[:, 0]  # [B]
  return cache, start


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def _search(graphdef, params, cache, start, tables, *, spec):
  model = nnx.merge(graphdef, params)
  levels = len(spec.token_offset)
  full = generator._cache_len(0, levels)  # the slots after the prompt
  t = _cache_slots(cache) - full
  prompt_cache = cache.truncate(t)
  code_ids = beam.level_token_ids(spec.token_offset, max(tables.codebook_sizes),
                                  model.backbone.embedding[...].shape[0])  # [L, W]

  def step(tok, c, level):
    h, c = model.backbone(tok[:, None], cache=c, decode=True, shared=prompt_cache)
    return model.backbone.token_logits(h, code_ids[level])[:, 0], c

  own = bb.beam_cache(prompt_cache, full)
  return beam.beam_search(step, start, own, tables, num_beams=spec.num_beams,
                          token_offset=spec.token_offset, level_logits=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def _q_pass(graphdef, params, cache, res, *, spec):
  model = nnx.merge(graphdef, params)
  t = _cache_slots(cache) - generator._cache_len(0, len(spec.token_offset))
  prompt_cache = cache.truncate(t)
  b, k = res.scores.shape
  q_in = jnp.stack([res.last_tokens.reshape(-1),
                    jnp.full((b * k,), spec.query_token, jnp.int32)], axis=1)  # [BK, 2]
  h, _ = model.backbone(q_in, cache=res.cache, shared=prompt_cache)
  return model.query(h[:, 1]).reshape(b, k, -1)  # [B, K, D]


@functools.partial(jax.jit, static_argnames=("spec",))
def _rank(q, scores, valid, prefix_ids, bucket_table, item_keys, allowed, tau, *, spec):
  cand, cos = fusion.bucket_retrieval(q, prefix_ids, bucket_table, item_keys, spec.top_m,
                                      allowed, normalize=spec.normalize)
  if spec.fuse:
    return fusion.apf_rank(scores, valid, cand, cos, tau, spec.top_n)
  return fusion.unfused_rank(scores, valid, cand, cos, spec.top_n)


def _cache_slots(cache) -> int:
  """The slots of a `backbone.KVCache` (its sequence axis)."""
  return int(cache.valid.shape[1])
