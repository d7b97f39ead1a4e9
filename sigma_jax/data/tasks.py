"""The seven instruction tasks of DESIGN §4, rebuilt from public data.

Families and tasks:
  general        justforyou  the next item
  constrained    query       the next item; the instruction carries a search query of 1-3 of
                             the target's terms that matches >= query_min_matches items
                 category    the next item; the instruction carries one of the target's
                             categories
  exploratory    longtail    the next item, when it is in the low-popularity tail
                 discover    the next item, when it has a category absent from the history
  common_sense   season      the next item; the instruction carries the season of its timestamp
                 holiday     the next item, when its timestamp is in a holiday window; the
                             instruction carries the holiday

Definitions used everywhere (training examples, evaluation examples, constraint masks):
- Categories (`item_categories`): Amazon items have one category each, their full path
  ("Beauty > Makeup > Face"); a leaf name alone can repeat under different parents. MovieLens
  items have their genres, several per item (or none); a constraint on genre g is satisfied by
  every item that has g.
- Query (`QueryIndex`, `query_matches`): terms are the words of `pairs.title_terms` (lower case,
  4+ letters, no stop words). An item's searchable terms are those of its title, categories (or
  genres), tags and brand (`item_search_terms`); an item satisfies a query when its searchable
  terms contain every query term. A target's query does not name it: it is 1 to 3 terms
  (`query_min_terms`..`query_max_terms`, the length drawn per example) of the target's own
  searchable terms that together still match at least `query_min_matches` items (default 50),
  so decoding ranks among many items, the target one of them. Only terms that at least
  `query_min_matches` items have, that at most `QUERY_MAX_TERM_SHARE` of the catalogue has, and
  that are not units (`QUERY_STOP`) are used; they are visited in a random order and each kept
  while the query still matches enough items. When that leaves fewer than `query_min_terms`
  terms, the broadest-first chain is used. A target with no such query at all (no usable term:
  e.g. a film without genres or tags whose title words are rare) gets no Query example: it is
  dropped, and `task_counts` reports the dropped count and the matches per query per split.
- Popularity tail (`tail_items`): item popularity is counted on the training split only. The
  head is the smallest set of most popular items (ties: lower item index first) that covers
  `longtail_head_share` of the training interactions; every other item, including items never
  seen in training, is the tail.
- Discover: the target has at least one category that no item of the history shown to the model
  (the last H items) has. The model can only judge novelty against what it is shown.
- Season / holiday: `pairs.season_of` and `pairs.holiday_of(ts, holiday_days)` on the target's
  timestamp (UTC); a holiday window is the `holiday_days` days up to and including the holiday.

Examples: training examples come from the training split only -- every position t >= 1 of a
user's training sequence is a candidate target with the previous <= H items as history, kept
when it obeys the task's rule, at most `max_train_per_user` per user and task (a seeded sample).
Evaluation examples are the validation (valid_hist -> valid_target) and test (test_hist ->
test_target) rows under the same rules. Training targets are therefore never a validation or
test (user, position). Every random choice (template, query length and terms, which genre, the
training cap sample) comes from a generator seeded by (`phrasings_seed`, task, split), so a split
is the same whether built alone or with the others.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sigma_jax.data import pairs
from sigma_jax.data.splits import PAD_ITEM

TASKS = ("justforyou", "query", "category", "longtail", "discover", "season", "holiday")
FAMILIES = {
    "general": ("justforyou",),
    "constrained": ("query", "category"),
    "exploratory": ("longtail", "discover"),
    "common_sense": ("season", "holiday"),
}
TASK_FAMILY = {t: f for f, ts in FAMILIES.items() for t in ts}
# Tasks whose instruction is a hard constraint the decoder enforces (DESIGN §1.4 step 1); the
# exploratory tasks have an item rule too, used for metrics, not for decoding.
HARD_CONSTRAINT_TASKS = ("query", "category")
SPLITS = ("train", "validation", "test")

TASK_DEFAULTS = {
    # Longtail: the head is the most popular items (training-split counts) that together cover
    # this share of all training interactions; every other item is the tail.
    "longtail_head_share": 0.8,
    # Holiday: a window is this many days up to and including the holiday (as pairs.py).
    "holiday_days": 14,
    # Query: the number of terms is drawn per example, uniformly in [min, max] ...
    "query_min_terms": 1,
    "query_max_terms": 3,
    # ... and a term is added only while at least this many items still match the query (a
    # target with no such query has no Query example; see the module docstring).
    "query_min_matches": 50,
    # Training examples per user per task (a seeded sample of the eligible positions); 0: all.
    "max_train_per_user": 50,
    # Seeds every per-example choice: template, query length, which genre, the training sample.
    "phrasings_seed": 0,
}

SEASON_NAMES = ("winter", "spring", "summer", "autumn")  # pairs.season_of ids
_HOLIDAY_DISPLAY = {"new_year": "New Year", "valentines_day": "Valentine's Day",
                    "independence_day": "Independence Day", "halloween": "Halloween",
                    "christmas": "Christmas"}
HOLIDAY_NAMES = tuple(_HOLIDAY_DISPLAY.get(k, k.replace("_", " ").title())
                      for k in pairs.HOLIDAYS)  # pairs.holiday_of ids

# Instruction phrasings; the placeholder carries the task's constraint.
TEMPLATES = {
    "justforyou": (
        "Recommend the next item for this user.",
        "What will the user want next?",
        "Based on this history, suggest one item the user is likely to enjoy next.",
        "Pick the item this user is most likely to interact with next.",
    ),
    "query": (
        'Find an item matching the search query: "{query}".',
        'The user searches for "{query}". Recommend a matching item.',
        "Search: {query}. Which item fits this user best?",
        'Recommend an item for the query "{query}" that suits this user.',
    ),
    "category": (
        "Recommend an item from the category: {category}.",
        "The user is browsing {category}. What should they see next?",
        "Suggest an item in the category {category} for this user.",
        "Pick an item from {category} that this user will like.",
    ),
    "longtail": (
        "Recommend something less popular that the user may still like.",
        "Suggest a less popular, hidden-gem item for this user.",
        "Skip the bestsellers: recommend a less popular item this user would enjoy.",
        "Find a less popular item that matches this user's taste.",
    ),
    "discover": (
        "Recommend something new, from a category the user has not tried.",
        "Help the user discover something new, outside the categories in this history.",
        "Suggest something new: an item from a category missing from this history.",
        "The user wants something new. Recommend an item from an unexplored category.",
    ),
    "season": (
        "Recommend an item for the season: {season}.",
        "It is {season}. What should this user get next?",
        "Suggest an item that suits {season} for this user.",
        "Recommend the next item for this user this {season}.",
    ),
    "holiday": (
        "Recommend an item for the holiday: {holiday}.",
        "{holiday} is coming up. What should this user get?",
        "Suggest an item for this user ahead of {holiday}.",
        "The user is preparing for {holiday}. Recommend the next item.",
    ),
}
_PLACEHOLDER = {"query": "query", "category": "category", "season": "season",
                "holiday": "holiday"}

# File formats whose `category_path` is a set of genres, not a hierarchy.
_GENRE_FORMATS = ("movielens",)


def all_template_texts() -> list:
  """Every phrasing with each placeholder filled by a sample value, for the text tokenizer.

  Returns:
    list[str] of instruction texts.
  """
  fill = {"query": "vitamin serum", "category": "Beauty > Skin Care",
          "season": " ".join(SEASON_NAMES), "holiday": ", ".join(HOLIDAY_NAMES)}
  return [t.format(**fill) for task in TASKS for t in TEMPLATES[task]]


def _raw(dataset):
  """The RawDataset of a loader.Dataset, or the argument itself."""
  return getattr(dataset, "raw", dataset)


def resolve_config(task_cfg=None) -> dict:
  """TASK_DEFAULTS overridden by the fields of ``task_cfg`` (a ConfigDict, a dict or None).

  Returns:
    dict with every key of TASK_DEFAULTS, type-checked.

  Raises:
    ValueError: a value is out of range.
  """
  cfg = dict(TASK_DEFAULTS)
  if task_cfg is not None:
    for k in TASK_DEFAULTS:
      if k in task_cfg:
        cfg[k] = type(TASK_DEFAULTS[k])(task_cfg[k])
  if not 0.0 < cfg["longtail_head_share"] < 1.0:
    raise ValueError(f"tasks.longtail_head_share must be in (0, 1), got "
                     f"{cfg['longtail_head_share']}")
  if cfg["holiday_days"] < 1:
    raise ValueError(f"tasks.holiday_days must be >= 1, got {cfg['holiday_days']}")
  if not 1 <= cfg["query_min_terms"] <= cfg["query_max_terms"]:
    raise ValueError("tasks.query_min_terms and query_max_terms must satisfy 1 <= min <= max, "
                     f"got {cfg['query_min_terms']}, {cfg['query_max_terms']}")
  if cfg["query_min_matches"] < 1:
    raise ValueError(f"tasks.query_min_matches must be >= 1, got {cfg['query_min_matches']}")
  if cfg["max_train_per_user"] < 0:
    raise ValueError(f"tasks.max_train_per_user must be >= 0, got {cfg['max_train_per_user']}")
  return cfg


# ---------------------------------------------------------------------------------------------
# Availability


def available_tasks(dataset) -> tuple:
  """The tasks the dataset's fields allow.

  Args:
    dataset: a loader.Dataset or a raw.RawDataset.

  Returns:
    (list[str] of available task names in TASKS order, dict[str, str] task -> why it is not).
  """
  data = _raw(dataset)
  reasons = {}
  if not data.has_timestamps:
    why = f"{data.name} has no interaction timestamps"
    reasons["season"] = why + ", so an interaction has no season"
    reasons["holiday"] = why + ", so no interaction can be placed in a holiday window"
  if not any(it.category_path for it in data.items):
    reasons["category"] = f"{data.name} items have no category"
    reasons["discover"] = f"{data.name} items have no category, so none can be new to a user"
  if not any(item_search_terms(it) for it in data.items):
    reasons["query"] = f"{data.name} items have no searchable words"
  return [t for t in TASKS if t not in reasons], reasons


# ---------------------------------------------------------------------------------------------
# Item tables: categories, popularity, query index


def item_categories(dataset) -> tuple:
  """The categories and which items belong to each.

  Args:
    dataset: a loader.Dataset or a raw.RawDataset.

  Returns:
    (names: list[str] of C category names, sorted; membership: [N, C] bool). Amazon: one full
    category path per item. MovieLens: the item's genres (zero or more).
  """
  data = _raw(dataset)
  per_item = _item_category_names(data)
  names = sorted({c for cs in per_item for c in cs})
  col = {c: j for j, c in enumerate(names)}
  rows = [i for i, cs in enumerate(per_item) for _ in cs]
  cols = [col[c] for cs in per_item for c in cs]
  membership = np.zeros((len(data.items), len(names)), bool)
  membership[rows, cols] = True
  return names, membership


def _item_category_names(data) -> list:
  if data.format in _GENRE_FORMATS:
    return [list(dict.fromkeys(it.category_path)) for it in data.items]
  return [[" > ".join(it.category_path)] if it.category_path else [] for it in data.items]


def primary_category(dataset) -> np.ndarray:
  """One category per item: the path (Amazon) or the first listed genre (MovieLens).

  Args:
    dataset: a loader.Dataset or a raw.RawDataset.

  Returns:
    [N] int32 index into ``item_categories(dataset)[0]``, -1 for an item without a category.
  """
  names, _ = item_categories(dataset)
  col = {c: j for j, c in enumerate(names)}
  return np.array([col[cs[0]] if cs else -1 for cs in _item_category_names(_raw(dataset))],
                  np.int32)


def train_popularity(splits) -> np.ndarray:
  """[N] int64 interactions per item in the training split."""
  seqs = [np.asarray(s, np.int64) for s in splits.train_seqs]
  flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
  return np.bincount(flat, minlength=splits.num_items)


def tail_items(splits, head_share: float) -> np.ndarray:
  """[N] bool, True for the long-tail items (see the module docstring).

  Args:
    splits: the dataset's Splits; popularity is counted on ``train_seqs`` only.
    head_share: the share of training interactions the head covers, in (0, 1).
  """
  pop = train_popularity(splits)
  order = np.lexsort((np.arange(len(pop)), -pop))  # most popular first, then lower index
  covered = np.cumsum(pop[order])
  # The head is the shortest prefix of `order` whose interactions reach the share.
  n_head = int(np.searchsorted(covered, head_share * covered[-1], side="left")) + 1
  tail = np.ones(len(pop), bool)
  tail[order[:n_head]] = False
  return tail


# A term in more than this share of the catalogue ("beauty" on Beauty) narrows nothing; it is
# never put in a query.
QUERY_MAX_TERM_SHARE = 0.5
# Units and packaging words: searchable (a user may type them) but never a generated query term.
QUERY_STOP = frozenset("ounce ounces fluid gram grams pound pounds liter liters inches piece "
                       "pieces total".split())


def item_search_terms(item) -> set:
  """An item's searchable terms: the ``pairs.title_terms`` of its title, categories (or
  genres), tags and brand."""
  fields = [item.title, " ".join(item.category_path), " ".join(item.tags), item.brand]
  return set().union(*(pairs.title_terms(f) for f in fields))


class QueryIndex:
  """Searchable terms of every item: an inverted index and document frequencies.

  Attributes:
    num_items: N.
    postings: dict term -> sorted [k] int64 item indices that have the term
      (``item_search_terms``).
  """

  def __init__(self, dataset):
    data = _raw(dataset)
    self.num_items = len(data.items)
    self._terms = [item_search_terms(it) for it in data.items]
    # Where a term first appears in the item's fields: a query lists its terms in that order.
    self._order_text = [" ".join([it.title, *it.category_path, *it.tags, it.brand]).lower()
                        for it in data.items]
    postings = {}
    for i, terms in enumerate(self._terms):
      for w in terms:
        postings.setdefault(w, []).append(i)
    self.postings = {w: np.asarray(v, np.int64) for w, v in postings.items()}
    self._dense = {}
    self._cache = {}

  def df(self, term: str) -> int:
    return len(self.postings.get(term, ()))

  def _mask(self, term: str) -> np.ndarray:
    """[N] bool of the items that have ``term`` (memoised)."""
    m = self._dense.get(term)
    if m is None:
      m = self._dense[term] = np.zeros(self.num_items, bool)
      m[self.postings.get(term, np.zeros(0, np.int64))] = True
    return m

  def matches(self, query: str) -> np.ndarray:
    """[N] bool, True for the items that have every term of ``query`` (all for no terms)."""
    mask = np.ones(self.num_items, bool)
    for w in query_terms(query):
      mask = mask & self._mask(w)
    return mask

  def count(self, query: str) -> int:
    """The number of items that satisfy ``query``."""
    return int(np.count_nonzero(self.matches(query)))

  def candidates(self, item: int, min_matches: int) -> list:
    """The item's terms a query may use: at least ``min_matches`` items have each, at most
    ``QUERY_MAX_TERM_SHARE`` of the catalogue, none in ``QUERY_STOP``; sorted alphabetically."""
    key = ("candidates", item, min_matches)
    if key not in self._cache:
      hi = QUERY_MAX_TERM_SHARE * self.num_items
      self._cache[key] = sorted(w for w in self._terms[item]
                                if min_matches <= self.df(w) <= hi and w not in QUERY_STOP)
    return self._cache[key]

  def broad_chain(self, item: int, min_matches: int) -> list:
    """The fallback query's terms: the candidates from the broadest (highest document
    frequency) down, each kept only while at least ``min_matches`` items still match."""
    key = ("broad", item, min_matches)
    if key not in self._cache:
      terms = sorted(self.candidates(item, min_matches), key=lambda w: (-self.df(w), w))
      self._cache[key] = self._greedy(terms, len(terms), min_matches)
    return self._cache[key]

  def _greedy(self, terms, num_terms: int, min_matches: int) -> list:
    """``terms`` in order, each kept while the kept ones match ``min_matches`` items."""
    chosen, mask = [], None
    for w in terms:
      if len(chosen) >= num_terms:
        break
      if mask is None:  # a candidate alone matches enough items
        chosen, mask = [w], self._mask(w)
        continue
      narrowed = mask & self._mask(w)
      if np.count_nonzero(narrowed) >= min_matches:
        chosen.append(w)
        mask = narrowed
    return chosen

  def draw(self, item: int, num_terms: int, min_terms: int, min_matches: int,
           rng: np.random.Generator) -> str:
    """A query for ``item``: ``num_terms`` terms at most, at least ``min_matches`` items.

    The item's candidate terms are visited in a random order (``rng``); a term is kept while
    the query with it still matches at least ``min_matches`` items. When that leaves fewer than
    ``min_terms`` terms, the first ``num_terms`` terms of ``broad_chain`` are used instead. ''
    when the item has no query of ``min_terms`` terms (``has_query`` is False).
    """
    cands = self.candidates(item, min_matches)
    chosen = self._greedy([cands[j] for j in rng.permutation(len(cands))], num_terms,
                          min_matches)
    if len(chosen) < min_terms:
      chosen = self.broad_chain(item, min_matches)[:num_terms]
      if len(chosen) < min_terms:
        return ""
    low = self._order_text[item]
    return " ".join(sorted(chosen, key=lambda w: (low.find(w), w)))

  def has_query(self, item: int, min_terms: int, min_matches: int) -> bool:
    """Whether ``item`` has a query of at least ``min_terms`` terms (its ``broad_chain``)."""
    return len(self.broad_chain(item, min_matches)) >= min_terms


def query_terms(query: str) -> list:
  """The terms of a query string, in order."""
  return query.split()


_INDEX_CACHE = {}


def query_index(dataset) -> QueryIndex:
  """The (memoised) QueryIndex of a dataset."""
  data = _raw(dataset)
  hit = _INDEX_CACHE.get(id(data))
  if hit is None or hit[0] is not data:
    if len(_INDEX_CACHE) >= 4:
      _INDEX_CACHE.clear()
    hit = _INDEX_CACHE[id(data)] = (data, QueryIndex(data))
  return hit[1]


def query_matches(query: str, dataset) -> np.ndarray:
  """Which items satisfy a query: their title or text has every query term.

  Args:
    query: a query string (space-separated terms, as in TaskExamples.constraint).
    dataset: a loader.Dataset or a raw.RawDataset.

  Returns:
    [N] bool.
  """
  return query_index(dataset).matches(query)


def make_query(item: int, dataset, num_terms: int, min_matches: int = 50, min_terms: int = 1,
               seed: int = 0) -> str:
  """One search query for an item (``QueryIndex.draw``, drawn with ``seed``); '' when none."""
  return query_index(dataset).draw(int(item), int(num_terms), int(min_terms), int(min_matches),
                                   np.random.default_rng(seed))


# ---------------------------------------------------------------------------------------------
# Examples


@dataclasses.dataclass
class TaskExamples:
  """The examples of one task on one split.

  Attributes:
    task: the task name.
    split: 'train' | 'validation' | 'test'.
    user: [M] int64 user indices.
    position: [M] int32, the target's index in the user's full chronological sequence.
    history: [M, H] int32, the previous <= H items, left-padded with PAD_ITEM (newest last).
    target: [M] int32.
    timestamp: [M] int64 unix seconds of the target interaction, or None without timestamps.
    template: [M] int32, which of TEMPLATES[task] phrased the instruction.
    instruction: M instruction strings.
    constraint: category: [M] int32 category ids (into ``constraint_names``); query: M query
      strings; season: [M] int32 season ids; holiday: [M] int32 holiday ids; else None.
    constraint_names: the names of the ids in ``constraint`` (categories, SEASON_NAMES,
      HOLIDAY_NAMES), else None.
    hard_constraint: the decoder must restrict generation to ``allowed(i)``.
  """
  task: str
  split: str
  user: np.ndarray
  position: np.ndarray
  history: np.ndarray
  target: np.ndarray
  timestamp: np.ndarray | None
  template: np.ndarray
  instruction: list
  constraint: object
  constraint_names: list | None
  hard_constraint: bool
  _allowed: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

  def __len__(self) -> int:
    return len(self.target)

  @property
  def has_item_rule(self) -> bool:
    """Whether the task defines which items fit an example (``allowed`` is not None)."""
    return self._allowed is not None

  def allowed(self, i: int) -> np.ndarray | None:
    """The items that satisfy example ``i``'s rule.

    category: the items of the category; query: the items matching the query; longtail: the
    tail items; discover: the items with a category absent from the history. justforyou,
    season and holiday have no item-level rule: None.

    Returns:
      [N] bool, or None.
    """
    return None if self._allowed is None else self._allowed(int(i))

  def allowed_batch(self, rows) -> np.ndarray | None:
    """[B, N] bool for the given example rows, or None (see ``allowed``)."""
    if self._allowed is None:
      return None
    return np.stack([self._allowed(int(i)) for i in rows])

  def subset(self, rows) -> "TaskExamples":
    """The examples at ``rows`` ([B] int indices), with the same allowed-set rule."""
    rows = np.asarray(rows, np.int64)
    take = lambda a: None if a is None else a[rows]
    constraint = self.constraint
    if isinstance(constraint, list):
      constraint = [constraint[i] for i in rows]
    elif constraint is not None:
      constraint = constraint[rows]
    out = dataclasses.replace(
        self, user=self.user[rows], position=self.position[rows], history=self.history[rows],
        target=self.target[rows], timestamp=take(self.timestamp), template=self.template[rows],
        instruction=[self.instruction[i] for i in rows], constraint=constraint)
    if self._allowed is not None:
      parent = self._allowed
      out._allowed = lambda i: parent(int(rows[i]))
    return out


class _Context:
  """Item tables shared by the tasks of one dataset and config."""

  def __init__(self, dataset, cfg: dict):
    self.dataset, self.cfg = dataset, cfg
    self.data, self.splits = dataset.raw, dataset.splits
    self.available, self.reasons = available_tasks(dataset)
    self.history_len = int(self.splits.valid_hist.shape[1])
    self.num_items = len(self.data.items)
    self.cat_names, self.membership = item_categories(self.data)
    self.tail = tail_items(self.splits, cfg["longtail_head_share"])
    self.query_index = query_index(self.data) if "query" in self.available else None
    self._has_query = None

  def has_query(self) -> np.ndarray:
    """[N] bool: the item has a query of at least ``query_min_terms`` terms that matches at
    least ``query_min_matches`` items (``QueryIndex.has_query``)."""
    if self._has_query is None:
      k, m = self.cfg["query_min_terms"], self.cfg["query_min_matches"]
      self._has_query = np.array([self.query_index.has_query(i, k, m)
                                  for i in range(self.num_items)], bool)
    return self._has_query


@dataclasses.dataclass
class _Candidates:
  """Every (user, position) a split offers as a target, before the task rules."""
  user: np.ndarray  # [K] int64
  row: np.ndarray  # [K] int64, the user's row in the Splits arrays
  position: np.ndarray  # [K] int32
  history: np.ndarray  # [K, H] int32
  target: np.ndarray  # [K] int32
  timestamp: np.ndarray | None  # [K] int64


def _candidates(ctx: _Context, split: str) -> _Candidates:
  s, hlen = ctx.splits, ctx.history_len
  if split in ("validation", "test"):
    valid = split == "validation"
    lengths = np.array([len(q) for q in s.train_seqs], np.int64)
    return _Candidates(
        user=np.asarray(s.users, np.int64), row=np.arange(len(s.users)),
        position=(lengths + (0 if valid else 1)).astype(np.int32),
        history=np.asarray(s.valid_hist if valid else s.test_hist, np.int32),
        target=np.asarray(s.valid_target if valid else s.test_target, np.int32),
        timestamp=None if s.valid_ts is None else
        np.asarray(s.valid_ts if valid else s.test_ts, np.int64))
  if split != "train":
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  # Every training sequence, left-padded by H, in one flat array; the history of position t
  # is then the H entries just before t.
  seqs = [np.asarray(q, np.int32) for q in s.train_seqs]
  padded = [np.concatenate([np.full(hlen, PAD_ITEM, np.int32), q]) for q in seqs]
  starts = np.cumsum([0] + [len(p) for p in padded])[:-1]
  flat = np.concatenate(padded)
  rows = np.concatenate([np.full(max(len(q) - 1, 0), r, np.int64) for r, q in enumerate(seqs)])
  pos = np.concatenate([np.arange(1, len(q), dtype=np.int64) for q in seqs])
  base = starts[rows] + pos  # flat index of the first history slot of (row, pos)
  hist = flat[base[:, None] + np.arange(hlen)]
  target = flat[base + hlen]
  ts = None
  if s.train_ts is not None:
    ts = np.concatenate([np.asarray(t, np.int64)[1:] for t in s.train_ts])
  return _Candidates(user=np.asarray(s.users, np.int64)[rows], row=rows,
                     position=pos.astype(np.int32), history=hist, target=target, timestamp=ts)


def _new_category(ctx: _Context, history: np.ndarray, items: np.ndarray) -> np.ndarray:
  """[K] bool: item k has a category that no item of history k has."""
  out = np.zeros(len(items), bool)
  if ctx.membership.sum(axis=1).max(initial=0) <= 1:
    # One category per item (Amazon): compare category ids, no [K, H, C] tensor.
    cat = np.where(ctx.membership.any(axis=1), ctx.membership.argmax(axis=1), -1)
    hist_cat = np.where(history >= 0, cat[np.maximum(history, 0)], -1)
    mine = cat[items]
    return (mine >= 0) & ~(hist_cat == mine[:, None]).any(axis=1)
  chunk = max(1, 2**22 // max(1, history.shape[1] * ctx.membership.shape[1]))
  for a in range(0, len(items), chunk):
    h = history[a:a + chunk]
    seen = (ctx.membership[np.maximum(h, 0)] & (h >= 0)[..., None]).any(axis=1)  # [k, C]
    out[a:a + chunk] = (ctx.membership[items[a:a + chunk]] & ~seen).any(axis=1)
  return out


def _eligible(ctx: _Context, task: str, cand: _Candidates) -> np.ndarray:
  """[K] bool, the candidates that obey the task's rule."""
  cfg = ctx.cfg
  if task in ("justforyou", "season"):
    return np.ones(len(cand.target), bool)
  if task == "query":
    return ctx.has_query()[cand.target]
  if task == "category":
    return ctx.membership[cand.target].any(axis=1)
  if task == "longtail":
    return ctx.tail[cand.target]
  if task == "discover":
    return _new_category(ctx, cand.history, cand.target)
  if task == "holiday":
    return _holiday(cand.timestamp, cfg["holiday_days"]) >= 0
  raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _holiday(ts: np.ndarray, days: int) -> np.ndarray:
  return pairs.holiday_of(ts, days) if len(ts) else np.zeros(0, np.int64)


def _cap_per_user(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
  """[K] bool keeping a random ``cap`` of the candidates of each user (rows sorted by user)."""
  if cap <= 0 or len(rows) == 0:
    return np.ones(len(rows), bool)
  key = rng.random(len(rows))
  order = np.lexsort((key, rows))
  sorted_rows = rows[order]
  first = np.searchsorted(sorted_rows, sorted_rows, side="left")
  rank = np.empty(len(rows), np.int64)
  rank[order] = np.arange(len(rows)) - first
  return rank < cap


def _build_task(ctx: _Context, task: str, split: str, cand: _Candidates) -> TaskExamples:
  cfg = ctx.cfg
  rng = np.random.default_rng([cfg["phrasings_seed"], TASKS.index(task), SPLITS.index(split)])
  keep = _eligible(ctx, task, cand)
  if split == "train":
    # The cap samples among the eligible positions only, so a rare task keeps what it has.
    idx = np.flatnonzero(keep)
    keep = np.zeros(len(cand.target), bool)
    keep[idx[_cap_per_user(cand.row[idx], cfg["max_train_per_user"], rng)]] = True
  sel = np.flatnonzero(keep)
  m = len(sel)
  target = cand.target[sel]
  ts = None if cand.timestamp is None else cand.timestamp[sel]
  templates = TEMPLATES[task]
  template = rng.integers(0, len(templates), size=m).astype(np.int32)
  constraint, names, fill, allowed = None, None, None, None

  if task == "category":
    # One of the target's categories, drawn per example (Amazon items have exactly one).
    member = ctx.membership[target]
    counts = member.sum(axis=1)
    pick = np.floor(rng.random(m) * counts).astype(np.int64)
    _, cols = np.nonzero(member)  # row-major: each row's categories are contiguous
    constraint = cols[np.cumsum(counts) - counts + pick].astype(np.int32)
    names = list(ctx.cat_names)
    fill = [names[c] for c in constraint]
    membership = ctx.membership
    allowed = lambda i: membership[:, constraint[i]].copy()
  elif task == "query":
    lengths = rng.integers(cfg["query_min_terms"], cfg["query_max_terms"] + 1, size=m)
    qi = ctx.query_index
    constraint = [qi.draw(int(t), int(k), cfg["query_min_terms"], cfg["query_min_matches"], rng)
                  for t, k in zip(target, lengths)]
    fill = constraint
    allowed = lambda i: qi.matches(constraint[i])
  elif task == "longtail":
    tail = ctx.tail
    allowed = lambda i: tail.copy()
  elif task == "discover":
    membership, hist = ctx.membership, cand.history[sel]

    def allowed(i):
      h = hist[i][hist[i] >= 0]
      seen = membership[h].any(axis=0)
      return (membership & ~seen).any(axis=1)
  elif task == "season":
    constraint = pairs.season_of(ts).astype(np.int32) if m else np.zeros(0, np.int32)
    names = list(SEASON_NAMES)
    fill = [names[c] for c in constraint]
  elif task == "holiday":
    constraint = _holiday(ts, cfg["holiday_days"]).astype(np.int32)
    names = list(HOLIDAY_NAMES)
    fill = [names[c] for c in constraint]

  if fill is None:
    instruction = [templates[j] for j in template]
  else:
    key = _PLACEHOLDER[task]
    instruction = [templates[j].format(**{key: v}) for j, v in zip(template, fill)]
  return TaskExamples(
      task=task, split=split, user=cand.user[sel], position=cand.position[sel],
      history=cand.history[sel], target=target, timestamp=ts, template=template,
      instruction=instruction, constraint=constraint, constraint_names=names,
      hard_constraint=task in HARD_CONSTRAINT_TASKS, _allowed=allowed)


def build_tasks(dataset, task_cfg=None, split: str = "train", tasks=None) -> dict:
  """The examples of every task on one split.

  Args:
    dataset: a loader.Dataset (raw data + leave-one-out splits).
    task_cfg: overrides of TASK_DEFAULTS (ConfigDict, dict or None).
    split: 'train' | 'validation' | 'test'.
    tasks: task names to build (default: every available task).

  Returns:
    dict task -> TaskExamples, in TASKS order.

  Raises:
    ValueError: an unknown split or task, or a requested task the dataset cannot build.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  ctx = _Context(dataset, resolve_config(task_cfg))
  return _build_split(ctx, split, tasks)


def _build_split(ctx: _Context, split: str, tasks) -> dict:
  names = ctx.available if tasks is None else list(tasks)
  for t in names:
    if t not in TASKS:
      raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    if t in ctx.reasons:
      raise ValueError(f"task {t!r} is not available on {ctx.data.name}: {ctx.reasons[t]}")
  cand = _candidates(ctx, split)
  return {t: _build_task(ctx, t, split, cand) for t in TASKS if t in names}


def task_counts(dataset, task_cfg=None) -> dict:
  """Example counts per task and split, for WORKDIR/sft/tasks.json.

  Args:
    dataset: a loader.Dataset.
    task_cfg: overrides of TASK_DEFAULTS.

  Returns:
    {"dataset": name, "counts": {task: {split: M}}, "unavailable": {task: reason},
     "families": FAMILIES, "settings": the resolved task config,
     "tail_items": number of tail items, "categories": number of categories,
     "query": {split: query_stats(...)} where the Query task is available}.
  """
  ctx = _Context(dataset, resolve_config(task_cfg))
  counts = {t: {} for t in ctx.available}
  query = {}
  for split in SPLITS:
    cand = _candidates(ctx, split)
    for t, ex in _build_split(ctx, split, None).items():
      counts[t][split] = len(ex)
      if t == "query":
        query[split] = query_stats(ctx.query_index, ex.constraint,
                                   int((~ctx.has_query()[cand.target]).sum()))
  out = {"dataset": ctx.data.name, "counts": counts, "unavailable": dict(ctx.reasons),
         "families": {f: list(ts) for f, ts in FAMILIES.items()}, "settings": dict(ctx.cfg),
         "tail_items": int(ctx.tail.sum()), "categories": len(ctx.cat_names)}
  if query:
    out["query"] = query
  return out


def query_stats(index: QueryIndex, queries, dropped: int) -> dict:
  """How narrow a split's queries are.

  Args:
    index: the dataset's QueryIndex.
    queries: the split's query strings (one per example).
    dropped: the split's candidate targets that have no query (``has_query`` False), which no
      example was built for.

  Returns:
    {"examples", "dropped", "matches_min", "matches_median", "matches_max" (items matching each
     example's query), "terms_mean" (terms per query)}.
  """
  memo = {}
  n = np.array([memo[q] if q in memo else memo.setdefault(q, index.count(q)) for q in queries],
               np.int64)
  terms = np.array([len(query_terms(q)) for q in queries], np.int64)
  if not len(n):
    return {"examples": 0, "dropped": int(dropped)}
  return {"examples": int(len(n)), "dropped": int(dropped), "matches_min": int(n.min()),
          "matches_median": float(np.median(n)), "matches_max": int(n.max()),
          "terms_mean": round(float(terms.mean()), 3)}
