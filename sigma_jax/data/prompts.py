"""Instruction prompts as fixed-length arrays (DESIGN §1.3).

One example is laid out as

  <|start|> {profile} {history verb} a(h_1) <q> <item> a(h_2) <q> <item> … {instruction}
  <|end|> <|start|> a(target) <q>

where ``a(i)`` is item i's SID prefix (ℓ tokens; nothing in `gr_id` mode), ``<item>`` is the
placeholder whose input embedding is replaced by the item's ProjFuse vector, and the hidden
state at a ``<q>`` is the query that retrieves the item right after it. History items carry
their own ``<q>``: with ``every_position`` (JustForYou training) each history item after the
first is a target too — next-token loss on its prefix and retrieval loss at its ``<q>`` — so one
pass trains every position of the history. It is not the same as one example per position:
those history targets are predicted inside the history, before the instruction and
``<|end|> <|start|>``, while evaluation predicts after them (on Scientific, one example per
position scores far higher on validation; docs/RESULTS.md). Evaluation prompts stop right after
``<|end|> <|start|>``: the generator continues them.

`gr_sid` mode (``PromptSpec.sid_only``, TIGER-style) writes every item, history and target, as
its full SID (all levels plus the de-duplication level) and nothing else:

  <|start|> {profile} {history verb} a(h_1) a(h_2) … {instruction} <|end|> <|start|> a(target)

no ``<q>`` (so no retrieval target) and no ``<item>`` (no injected item embedding).

Arrays of one example, all [T] (right-padded):
  tokens        int32 token ids (PAD = 0 after the end);
  inject_items  int32 item index at <item> positions, -1 elsewhere;
  ntp_targets   int32 the next token where a prefix token is to be predicted, else 0;
  ntp_weights   float32 1 where ntp_targets counts;
  q_items       int32 the item to retrieve from the hidden state at this <q>, else -1;
  attn_mask     bool real tokens.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sigma_jax.data import text
from sigma_jax.data.splits import PAD_ITEM

HISTORY_VERB = "The user has interacted with the following items in order:"


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What the prompt builder needs from the tokenizers.

  Attributes:
    item_tokens: [N, ℓ'] token ids written for each item (its SID prefix; ℓ' may be 0).
    max_len: T.
    sid_only: items are their SID tokens alone, without `<q>` and `<item>` (`gr_sid`).
  """
  tok: text.TextTokenizer
  item_tokens: np.ndarray
  max_len: int
  sid_only: bool = False

  @property
  def prefix_len(self) -> int:
    return self.item_tokens.shape[1]


def item_token_table(tok: text.TextTokenizer, sids: np.ndarray, prefix_len: int) -> np.ndarray:
  """[N, ℓ] token ids of each item's SID prefix (levels 0..ℓ-1)."""
  cols = [tok.sid_token(level, sids[:, level]) for level in range(prefix_len)]
  return (np.stack(cols, axis=1) if cols else np.zeros((len(sids), 0))).astype(np.int32)


def _empty(t: int) -> dict:
  return {"tokens": np.zeros(t, np.int32), "inject_items": np.full(t, -1, np.int32),
          "ntp_targets": np.zeros(t, np.int32), "ntp_weights": np.zeros(t, np.float32),
          "q_items": np.full(t, -1, np.int32), "attn_mask": np.zeros(t, bool)}


class _Writer:
  def __init__(self, t: int):
    self.a, self.n, self.t = _empty(t), 0, t

  def put(self, token: int, inject: int = -1, q_item: int = -1):
    if self.n >= self.t:
      raise OverflowError
    self.a["tokens"][self.n] = token
    self.a["inject_items"][self.n] = inject
    self.a["q_items"][self.n] = q_item
    self.a["attn_mask"][self.n] = True
    self.n += 1

  def predict_next(self, token: int):
    """The token about to be written is a prediction target of the position before it."""
    self.a["ntp_targets"][self.n - 1] = token
    self.a["ntp_weights"][self.n - 1] = 1.0

  def item(self, spec: PromptSpec, item: int, is_target: bool, special: dict):
    """Item ``item``'s tokens: a(item) <q>, or a(item) alone when ``spec.sid_only``."""
    for tk in spec.item_tokens[item]:
      if is_target:
        self.predict_next(int(tk))
      self.put(int(tk))
    if not spec.sid_only:
      self.put(special[text.QUERY], q_item=item if is_target else -1)


def prompt_length(spec: PromptSpec, history_lens, instruction_lens, extra: int = 0,
                  with_target: bool = True) -> np.ndarray:
  """The token count ``build_prompt`` writes for each example, without writing it.

  Args:
    history_lens, instruction_lens: [E] history items (padding not counted) and instruction
      tokens of each example.
    extra: profile and history-verb tokens, the same for every example.
    with_target: training prompts (the target's tokens after ``<|end|> <|start|>``); False
      for evaluation prompts.
  """
  per_item = spec.prefix_len + (0 if spec.sid_only else 2)  # a(i) <q> <item>, or a(i)
  target = spec.prefix_len + (0 if spec.sid_only else 1) if with_target else 0  # a(t) <q>
  return (1 + int(extra) + np.asarray(history_lens, np.int64) * per_item
          + np.asarray(instruction_lens, np.int64) + 2 + target)


def build_prompt(spec: PromptSpec, history: np.ndarray, instruction_ids: list[int],
                 target: int | None, every_position: bool = False,
                 profile_ids: list[int] | None = None, verb_ids: list[int] | None = None
                 ) -> dict:
  """One example's arrays (see the module docstring).

  Args:
    history: [H] item indices, PAD_ITEM-padded on the left (or unpadded).
    instruction_ids: token ids of the instruction text.
    target: the target item; None builds an evaluation prompt ending at `<|end|> <|start|>`.
    every_position: also train on every history item after the first.
    profile_ids, verb_ids: token ids of the profile text and of the history verb.

  Raises:
    ValueError: an empty history, or a prompt longer than spec.max_len.
  """
  hist = [int(h) for h in np.asarray(history) if h != PAD_ITEM]
  if not hist:
    raise ValueError("empty history: a prompt needs at least one item")
  sp = spec.tok.special
  w = _Writer(spec.max_len)
  try:
    w.put(sp[text.START])
    for tk in (profile_ids or []) + (verb_ids or []):
      w.put(tk)
    for j, h in enumerate(hist):
      w.item(spec, h, is_target=every_position and j > 0, special=sp)
      if not spec.sid_only:
        w.put(sp[text.ITEM], inject=h)
    for tk in instruction_ids:
      w.put(tk)
    w.put(sp[text.END])
    w.put(sp[text.START])
    if target is not None:
      w.item(spec, int(target), is_target=True, special=sp)
  except OverflowError:
    raise ValueError(f"prompt of {len(hist)} history items and {len(instruction_ids)} "
                     f"instruction tokens does not fit in max_len={spec.max_len}; raise "
                     "sft.max_len or lower dataset.max_history") from None
  return w.a


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def compact(batch: dict, max_ntp: int, max_q: int, num_hard: int, prefix_ids: np.ndarray,
            bucket_table: np.ndarray, bucket_sizes: np.ndarray,
            rand: np.ndarray | None) -> dict:
  """Stacked prompt arrays [B, T] -> the loss's compact index form.

  Adds ntp_pos/ntp_tgt/ntp_w [B, max_ntp], q_pos/q_item [B, max_q] and hard [B, max_q,
  num_hard]: items drawn from the bucket of the query item's prefix (the hard negatives of
  L_ID), -1 where the bucket has no other item. Drops the [B, T] per-position target arrays.
  ``rand`` [B, max_q, num_hard] uniform [0, 1) draws pick the hard negatives (None when
  num_hard is 0); the caller draws them for the global batch, so a host's rows get the same
  negatives in a multi-process run as in a single-process one.
  """
  b = len(batch["tokens"])
  out = {k: batch[k] for k in ("tokens", "inject_items", "attn_mask")}
  ntp_pos = np.zeros((b, max_ntp), np.int32)
  ntp_tgt = np.zeros((b, max_ntp), np.int32)
  ntp_w = np.zeros((b, max_ntp), np.float32)
  q_pos = np.zeros((b, max_q), np.int32)
  q_item = np.full((b, max_q), -1, np.int32)
  for r in range(b):
    pos = np.flatnonzero(batch["ntp_weights"][r])[-max_ntp:]  # the newest targets if too many
    ntp_pos[r, :len(pos)] = pos
    ntp_tgt[r, :len(pos)] = batch["ntp_targets"][r, pos]
    ntp_w[r, :len(pos)] = 1.0
    qp = np.flatnonzero(batch["q_items"][r] >= 0)[-max_q:]
    q_pos[r, :len(qp)] = qp
    q_item[r, :len(qp)] = batch["q_items"][r, qp]
  hard = np.full((b, max_q, num_hard), -1, np.int32)
  if num_hard:
    valid = q_item >= 0
    bucket = prefix_ids[np.maximum(q_item, 0)]  # [B, Q]
    size = bucket_sizes[bucket]  # [B, Q]
    if rand is None or rand.shape != (b, max_q, num_hard):
      raise ValueError(f"need [{b}, {max_q}, {num_hard}] uniform draws for the hard negatives, "
                       f"got {None if rand is None else rand.shape}")
    pick = (rand * size[..., None]).astype(np.int64)
    cand = bucket_table[bucket[..., None], pick]  # [B, Q, M]
    hard = np.where(valid[..., None] & (size[..., None] > 1) & (cand != q_item[..., None]),
                    cand, -1).astype(np.int32)
  out.update(ntp_pos=ntp_pos, ntp_tgt=ntp_tgt, ntp_w=ntp_w, q_pos=q_pos, q_item=q_item,
             hard=hard)
  return out


def _units(batch: dict, lengths: np.ndarray, t: int, groups, trunk_len) -> list:
  """Examples -> units of [examples] to lay out contiguously (``pack``).

  Without ``groups`` every example is its own unit. With them, the examples of one group
  (ascending trunk length) form as few units as fit in t tokens: a unit of examples m_1..m_k
  takes the longest trunk once plus each example's part after its own trunk.
  """
  if groups is None:
    return [[i] for i in range(len(lengths))]
  groups, trunk_len = np.asarray(groups), np.asarray(trunk_len)
  units, by_group = [], {}
  for i in range(len(lengths)):
    if groups[i] < 0:
      units.append([i])
    else:
      by_group.setdefault(int(groups[i]), []).append(i)
  for members in by_group.values():
    members.sort(key=lambda i: (trunk_len[i], i))
    unit, tails = [], 0  # tails: the unit's tokens after each member's trunk
    for i in members:
      if unit and lengths[i] + tails > t:  # i's trunk is the longest so far: the unit's trunk
        units.append(unit)
        unit, tails = [], 0
      unit.append(i)
      tails += lengths[i] - trunk_len[i]
    units.append(unit)
  for unit in units:  # a unit's trunks are prefixes of its longest one; no target lies in one
    ref = unit[-1]
    for i in unit[:-1]:
      n = trunk_len[i]
      if not (np.array_equal(batch["tokens"][i, :n], batch["tokens"][ref, :n]) and
              np.array_equal(batch["inject_items"][i, :n], batch["inject_items"][ref, :n])):
        raise ValueError(f"examples {i} and {ref} share group {groups[i]} but example {i}'s "
                         "history is not a prefix of the other's")
    for i in unit if len(unit) > 1 else ():
      if ((batch["ntp_w"][i] > 0) & (batch["ntp_pos"][i] < trunk_len[i])).any() or \
         ((batch["q_item"][i] >= 0) & (batch["q_pos"][i] < trunk_len[i])).any():
        raise ValueError(f"example {i} has a target inside its shared history")
  return units


def _lay_out(unit: list, batch: dict, lengths: np.ndarray, trunk_len) -> tuple:
  """One unit's tokens in order: (sources, positions, branches, where).

  sources: (example, token index) of each of the unit's tokens; positions: their RoPE positions;
  branches: their branch ids (0 on the shared trunk, k on the unit's k-th example's own part;
  None for a unit of one example); where: for each example of the unit, the map from its own
  token index to the unit's.
  """
  if len(unit) == 1:
    i = unit[0]
    n = lengths[i]
    return [(i, j) for j in range(n)], np.arange(n), None, {i: np.arange(n)}
  ref = unit[-1]
  src, pos, branch, where = [], [], [], {}
  trunk_at = np.zeros(trunk_len[ref], np.int64)
  cut = 0
  for k, i in enumerate(unit, start=1):
    n = trunk_len[i]
    for j in range(cut, n):
      trunk_at[j] = len(src)
      src.append((ref, j)), pos.append(j), branch.append(0)
    cut = max(cut, n)
    own = np.empty(lengths[i], np.int64)
    own[:n] = trunk_at[:n]
    for j in range(n, lengths[i]):
      own[j] = len(src)
      src.append((i, j)), pos.append(j), branch.append(k)
    where[i] = own
  return src, np.asarray(pos), np.asarray(branch), where


def pack(batch: dict, row_multiple: int = 1, groups=None, trunk_len=None) -> dict:
  """A ``compact`` batch [B, T] -> the same examples packed several to a row [R, T].

  Examples are right-padded, so one uses its first ``attn_mask.sum()`` slots. They are placed
  first-fit in decreasing length order, each contiguous inside one row; R is the rows used,
  rounded up to a multiple of ``row_multiple`` (so R splits over the data-parallel devices;
  the extra rows are all padding). The token arrays (tokens, inject_items, attn_mask) become
  [R, T] and ``segment_ids`` [R, T] is added (k for the k-th example of a row, 0 for padding).
  The per-example arrays keep their [B, ...] shape and order, so in-batch and hard negatives
  are unchanged; ntp_pos and q_pos become flat indices into the R·T tokens (`sigma.sft_loss`
  reads a batch with segment_ids this way). With attention kept inside a segment and positions
  restarting at each (`backbone.Decoder`), the loss equals the unpacked batch's while the model
  runs over R rows instead of B.

  Shared histories (``sft.layout='one_pass'``): ``groups`` [B] (-1: none) and ``trunk_len`` [B]
  say which examples share their first ``trunk_len`` tokens (the history) with others of their
  group. Such examples become one segment that holds the longest history once, each example's
  own part (instruction, target) placed right after its history's last token as a branch
  (``branch_ids`` [R, T]: 0 on the shared history, k on the k-th example's part), with
  ``positions`` [R, T] continuing each branch from its history. The decoder's branch mask then
  gives every example the hidden states of its own prompt, so the loss is unchanged while each
  history is computed once. Both arrays are added whenever ``groups`` is given.
  """
  mask = np.asarray(batch["attn_mask"]).astype(bool)
  b, t = mask.shape
  lengths = mask.sum(1)
  if (mask != (np.arange(t)[None, :] < lengths[:, None])).any():
    raise ValueError("pack needs right-padded examples (real tokens first in every row)")
  shared = groups is not None
  units = _units(batch, lengths, t, groups, trunk_len)
  layouts = [_lay_out(u, batch, lengths, trunk_len) for u in units]
  sizes = np.array([len(lay[0]) for lay in layouts], np.int64)
  row_of, col_of, used = np.zeros(len(units), np.int64), np.zeros(len(units), np.int64), []
  for u in np.argsort(-sizes, kind="stable"):
    row = next((r for r, n in enumerate(used) if n + sizes[u] <= t), len(used))
    if row == len(used):
      used.append(0)
    row_of[u], col_of[u] = row, used[row]
    used[row] += sizes[u]
  rows = -(-max(len(used), 1) // row_multiple) * row_multiple
  out = {"tokens": np.zeros((rows, t), batch["tokens"].dtype),
         "inject_items": np.full((rows, t), -1, batch["inject_items"].dtype),
         "attn_mask": np.zeros((rows, t), bool),
         "segment_ids": np.zeros((rows, t), np.int32)}
  if shared:
    out["positions"] = np.zeros((rows, t), np.int32)
    out["branch_ids"] = np.zeros((rows, t), np.int32)
  seg_count = np.zeros(rows, np.int32)
  ntp_pos = np.zeros_like(batch["ntp_pos"], np.int64)
  q_pos = np.zeros_like(batch["q_pos"], np.int64)
  for u, (src, pos, branch, where) in enumerate(layouts):
    r, c, n = row_of[u], col_of[u], sizes[u]
    seg_count[r] += 1
    ex, tok = np.array(src, np.int64).T
    for k in ("tokens", "inject_items", "attn_mask"):
      out[k][r, c:c + n] = batch[k][ex, tok]
    out["segment_ids"][r, c:c + n] = seg_count[r]
    if shared:
      out["positions"][r, c:c + n] = pos
      out["branch_ids"][r, c:c + n] = 0 if branch is None else branch
    base = r * t + c  # flat index of the unit's first token
    for i, own in where.items():
      ntp_pos[i] = base + own[batch["ntp_pos"][i]]
      q_pos[i] = base + own[batch["q_pos"][i]]
  for k in ("ntp_tgt", "ntp_w", "q_item", "hard"):
    out[k] = batch[k]
  out["ntp_pos"] = ntp_pos.astype(np.int32)
  out["q_pos"] = q_pos.astype(np.int32)
  return out
