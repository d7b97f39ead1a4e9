"""The TIGER-style `gr_sid` row (issue 20): prompts of full SIDs alone, a next-token-only loss
and history exclusion inside the decoder; sigma and gr_id prompts as before.

Synthetic catalogue and tokenizer (`conftest.synthetic_assets`), random-init tiny model: no work
directory.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from sigma_jax.data import text
from sigma_jax.generate import generator as gen_lib
from sigma_jax.models import sigma as sigma_model
from sigma_jax.train import sft

from conftest import synthetic_assets

LEVELS, CODES, DEDUP = 2, 4, 3  # 2 levels of 4 codes plus a de-duplication level of 3
ITEMS = 40
SPM = 1000


def _assets(mode: str):
  return synthetic_assets(mode, items=ITEMS, levels=LEVELS, codes=CODES, dedup=DEDUP, spm=SPM)


def _sid(tok, sids, item, levels):
  return [int(tok.sid_token(lv, sids[item, lv])) for lv in range(levels)]


@pytest.mark.parametrize("mode", ["sigma", "gr_id", "gr_sid"])
def test_prompt_layout_per_mode(mode):
  """The exact token layout of one training and one evaluation prompt in each mode: sigma and
  gr_id as before issue 20, gr_sid as full SIDs with neither <q> nor <item>."""
  cfg, a = _assets(mode)
  tok, sids = a.tok, a.sids
  sp = tok.special
  s, e, q, it = sp[text.START], sp[text.END], sp[text.QUERY], sp[text.ITEM]
  verb = a.verb_ids
  instr = [900, 901]
  hist = np.array([-1, 3, 7])  # left-padded (PAD_ITEM = -1)
  levels = {"sigma": 1, "gr_id": 0, "gr_sid": LEVELS + 1}[mode]
  a3, a7, a5 = (_sid(tok, sids, i, levels) for i in (3, 7, 5))
  if mode == "gr_sid":
    history = a3 + a7
    inject = [-1] * len(history)
    target, target_q = a5, [-1] * len(a5)
  else:
    history = a3 + [q, it] + a7 + [q, it]
    inject = [-1] * len(a3) + [-1, 3] + [-1] * len(a7) + [-1, 7]
    target, target_q = a5 + [q], [-1] * len(a5) + [5]
  head = [s] + verb + history + instr + [e, s]
  want = head + target
  got = sft.example_prompt(sft.Example(hist, instr, 5, False, "justforyou"), a)
  n = int(got["attn_mask"].sum())
  assert got["tokens"][:n].tolist() == want
  assert not got["attn_mask"][n:].any() and not got["tokens"][n:].any()
  pre = [-1] * (1 + len(verb))
  post = [-1] * (len(instr) + 2)
  assert got["inject_items"][:n].tolist() == pre + inject + post + [-1] * len(target)
  assert got["q_items"][:n].tolist() == [-1] * len(head) + target_q
  # Next-token targets: each of the target's SID tokens, predicted from the token before it.
  w = np.flatnonzero(got["ntp_weights"])
  np.testing.assert_array_equal(w, len(head) - 1 + np.arange(len(a5)))
  assert got["ntp_targets"][w].tolist() == a5
  # The evaluation prompt is the same up to <|end|> <|start|>.
  ev = gen_lib.prompts.build_prompt(a.spec, hist, instr, None, verb_ids=verb)
  assert ev["tokens"][:int(ev["attn_mask"].sum())].tolist() == head
  if mode == "gr_sid":
    assert a.spec.sid_only and (got["q_items"] < 0).all() and (got["inject_items"] < 0).all()
  else:
    assert not a.spec.sid_only


def test_sigma_every_position_layout_unchanged():
  """sigma's one-sequence layout: a <q> target at every history item after the first."""
  _, a = _assets("sigma")
  ex = sft.Example(np.array([3, 7, 9]), [900], 5, True, "justforyou")
  got = sft.example_prompt(ex, a)
  assert got["q_items"][got["q_items"] >= 0].tolist() == [7, 9, 5]
  assert got["inject_items"][got["inject_items"] >= 0].tolist() == [3, 7, 9]


_MODELS = {}


def _model(cfg, assets):
  """(graphdef, params) of a random-init tiny SigmaModel, built once per mode."""
  if assets.mode not in _MODELS:
    _MODELS[assets.mode] = nnx.split(sft._new_model(cfg, assets))
  return _MODELS[assets.mode]


@pytest.mark.parametrize("negatives", ["batch", "catalogue"])
def test_gr_sid_loss_is_next_token_only_and_finite(negatives):
  """No <q> in a gr_sid batch: L_ID is 0 (not NaN), the loss is L_NTP, gradients finite."""
  cfg, a = _assets("gr_sid")
  assert cfg.sft.mu == 0.0
  cfg.sft.layout = "per_position"
  cfg.sft.hard_negatives = 2
  rng = np.random.default_rng(1)
  examples = [sft.Example(rng.choice(ITEMS, 4, replace=False), [900, 901], int(t), False,
                          "justforyou") for t in rng.integers(0, ITEMS, 6)]
  batch = sft.make_batch(examples, np.arange(6), a, cfg, np.random.default_rng(2))
  assert (batch["q_item"] < 0).all() and (batch["hard"] < 0).all()
  assert (batch["inject_items"] < 0).all()
  assert batch["ntp_w"].sum() == 6 * (LEVELS + 1)
  graphdef, params = _model(cfg, a)
  feats = jax.numpy.asarray(a.feats)

  def loss_fn(p, mu):
    return sigma_model.sft_loss(nnx.merge(graphdef, p), batch, feats, mu, 0.07, negatives)

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  for mu in (0.0, 1.0):  # even with a weight, no <q> target means no L_ID term
    (loss, parts), grads = step(params, jax.numpy.float32(mu))
    assert np.isfinite(float(loss)) and float(parts["id"]) == 0.0
    np.testing.assert_allclose(float(loss), float(parts["ntp"]), rtol=1e-6)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _recommend(allowed, hist, exclude=True):
  cfg, a = _assets("gr_sid")
  graphdef, params = _model(cfg, a)
  g = gen_lib.Generator(cfg, a, graphdef, params, exclude_history=exclude)
  instr = [[900, 901]] * len(hist)
  return g.recommend(hist, instr, allowed), g


def test_gr_sid_lists_are_full_and_allowed():
  """History items and disallowed items are excluded inside the beam search: every returned
  item is allowed and the list is full (top_n = num_beams = 10) where >= 10 items remain."""
  rng = np.random.default_rng(3)
  b = 4
  hist = [rng.choice(ITEMS, 8, replace=False) for _ in range(b)]
  allowed = np.ones((b, ITEMS), bool)
  allowed[1, rng.choice(ITEMS, 15, replace=False)] = False  # a constraint on top
  allowed[2] = False
  allowed[2, np.concatenate([hist[2][:5], rng.permutation(np.setdiff1d(
      np.arange(ITEMS), hist[2]))[:12]])] = True  # 12 allowed items outside the history
  allowed[3] = False
  allowed[3, np.concatenate([hist[3][:3], np.setdiff1d(np.arange(ITEMS), hist[3])[:4]])] = True
  out, g = _recommend(allowed, hist)
  items = np.asarray(out.items)
  assert items.shape == (b, 10)
  for r in range(b):
    ok = allowed[r].copy()
    ok[hist[r]] = False
    got = items[r][items[r] >= 0]
    assert ok[got].all(), r
    assert len(set(got.tolist())) == len(got)
    want = min(10, int(ok.sum()))  # row 3: only 4 allowed items outside its history
    assert len(got) == want, (r, len(got), want)
    assert np.asarray(out.valid)[r].sum() == want
  # With nothing excluded the full tables serve every example, as before.
  none, _ = _recommend(None, hist, exclude=False)
  assert (np.asarray(none.items) >= 0).all()


def test_gr_sid_decoder_reaches_only_allowed_items():
  """Full lists come from the tries, not from the post-search filter: with the items the free
  search ranks first disallowed, the full-catalogue tries plus the filter (the earlier
  definition) return fewer items, the subset tries a full list without them."""
  cfg, a = _assets("gr_sid")
  graphdef, params = _model(cfg, a)
  g = gen_lib.Generator(cfg, a, graphdef, params, exclude_history=False)
  arrays = g.prompts([np.array([0, 1])], [[900, 901]])

  def run(tables, mask):
    out = gen_lib.generate(g.graphdef, g.params, g.item_keys, arrays["tokens"],
                           arrays["inject_items"], arrays["attn_mask"], g.feats, tables,
                           g.bucket_table, mask, 0.1, 0.0, spec=g.spec)
    items = np.asarray(out.items)[0]
    return items[items >= 0]

  free = run(g.full_tables, np.ones((1, ITEMS), bool))
  assert len(free) == 10
  mask = np.ones((1, ITEMS), bool)
  mask[0, free[:6]] = False
  filtered = run(g.full_tables, mask)  # the safety net alone: the six beams drop out
  assert filtered.tolist() == free[6:].tolist()
  # In the subset tries each level's softmax is over the allowed codes only, so the scores
  # (and possibly the order) differ from the free search's; the list is full.
  inside = run(g.tables_for(mask), mask)
  assert len(inside) == 10 and not set(inside.tolist()) & set(free[:6].tolist())


def test_gr_sid_nothing_allowed_is_an_error():
  hist = [np.array([1, 2])]
  allowed = np.zeros((1, ITEMS), bool)
  allowed[0, [1, 2]] = True
  with pytest.raises(ValueError, match="allows no item"):
    _recommend(allowed, hist)


@pytest.mark.parametrize("mode", ["sigma", "gr_id", "gr_sid"])
def test_prompt_length_counts_what_build_prompt_writes(mode):
  """`prompts.prompt_length` (sft's pre-flight check) equals the tokens `build_prompt` writes,
  for training and evaluation prompts of several history and instruction lengths."""
  _, a = _assets(mode)
  rng = np.random.default_rng(1)
  for n_hist, n_instr in [(1, 0), (3, 2), (5, 7)]:
    hist = np.concatenate([[-1, -1], rng.integers(0, ITEMS, n_hist)])  # left padding
    instr = [900 + i for i in range(n_instr)]
    for target in (5, None):
      got = gen_lib.prompts.build_prompt(a.spec, hist, instr, target, verb_ids=a.verb_ids)
      want = gen_lib.prompts.prompt_length(a.spec, [n_hist], [n_instr], len(a.verb_ids),
                                           with_target=target is not None)
      assert int(got["attn_mask"].sum()) == int(want[0])


def test_too_long_training_prompts_fail_before_training():
  """Prompts longer than sft.max_len are refused up front, with their task and the length that
  would fit, not by `build_prompt` in the middle of a run."""
  _, a = _assets("sigma")
  hist = np.arange(6)
  short = sft.Example(hist, [900], 7, False, "justforyou")
  long = sft.Example(hist, [900] * 30, 7, False, "category")
  n_long = int(gen_lib.prompts.prompt_length(a.spec, [6], [30], len(a.verb_ids))[0])
  sft.check_prompt_lengths([short, long], a, n_long)  # fits exactly: no error
  with pytest.raises(ValueError, match=rf"1 category\).*at least {n_long}"):
    sft.check_prompt_lengths([short, long, short], a, n_long - 1)
