"""The instruction task builder (DESIGN §4): rules, no leakage, availability, phrasings."""
import datetime
import os

import numpy as np
import pytest

from sigma_jax.data import pairs, raw, splits as splits_lib, tasks
from sigma_jax.data.loader import Dataset


def _dataset(name: str, manual_dir: str = "") -> Dataset:
  data = raw.parse(name, manual_dir)
  ts = [u.timestamps for u in data.users] if data.has_timestamps else None
  split = splits_lib.leave_one_out(range(len(data.users)), [u.items for u in data.users],
                                   len(data.items), 20, timestamps=ts)
  return Dataset(raw=data, splits=split)


@pytest.fixture(scope="module")
def demo():
  return _dataset("demo")


@pytest.fixture(scope="module")
def demo_tasks(demo):
  return {s: tasks.build_tasks(demo, None, s) for s in tasks.SPLITS}


def _holiday_gap(ts: int, holiday: str) -> int:
  """Days from the target's UTC date to the named holiday's next occurrence (independent)."""
  day = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).date()
  month, dom = pairs.HOLIDAYS[holiday]
  date = datetime.date(day.year, month, dom)
  if date < day:
    date = datetime.date(day.year + 1, month, dom)
  return (date - day).days


_TABLES = {}


def _tables(ds: Dataset, share: float):
  key = (id(ds), share)
  if key not in _TABLES:
    _TABLES[key] = (*tasks.item_categories(ds), tasks.tail_items(ds.splits, share))
  return _TABLES[key]


def _search_terms(ds: Dataset) -> list:
  """Each item's searchable terms, computed here from its fields (not by tasks.QueryIndex)."""
  key = (id(ds), "terms")
  if key not in _TABLES:
    _TABLES[key] = [set().union(*(pairs.title_terms(f) for f in (
        it.title, " ".join(it.category_path), " ".join(it.tags), it.brand)))
                    for it in ds.raw.items]
  return _TABLES[key]


def _term_mask(ds: Dataset, term: str) -> np.ndarray:
  """[N] bool: the items whose ``_search_terms`` have ``term``."""
  key = (id(ds), "term", term)
  if key not in _TABLES:
    _TABLES[key] = np.array([term in t for t in _search_terms(ds)])
  return _TABLES[key]


def _check_examples(ds: Dataset, ex: tasks.TaskExamples, cfg: dict, limit: int = 10**9):
  """Asserts every example of ``ex`` obeys its task's rule; per-example loops stop at limit."""
  data, s = ds.raw, ds.splits
  names, membership, tail = _tables(ds, cfg["longtail_head_share"])
  hlen = s.valid_hist.shape[1]
  m = len(ex)
  assert ex.history.shape == (m, hlen) and ex.history.dtype == np.int32
  assert ex.target.dtype == np.int32 and len(ex.instruction) == m == len(ex.user)
  assert ((ex.template >= 0) & (ex.template < len(tasks.TEMPLATES[ex.task]))).all()
  for i in range(min(m, limit)):
    full = data.users[ex.user[i]].items
    pos = ex.position[i]
    # The target is the item at that position and the history the items before it.
    assert full[pos] == ex.target[i]
    want = full[max(0, pos - hlen):pos]
    assert (ex.history[i, hlen - len(want):] == want).all()
    assert (ex.history[i, :hlen - len(want)] == splits_lib.PAD_ITEM).all()
    if ex.timestamp is not None:
      assert data.users[ex.user[i]].timestamps[pos] == ex.timestamp[i]
    allowed = ex.allowed(i)
    if allowed is not None:
      assert allowed.shape == (len(data.items),) and allowed[ex.target[i]]
    if ex.task == "query":
      q = ex.constraint[i]
      item = data.items[ex.target[i]]
      assert q and f"{q}" in ex.instruction[i]
      words = q.split()
      assert cfg["query_min_terms"] <= len(words) <= cfg["query_max_terms"]
      assert len(set(words)) == len(words)
      # Every term is one of the target's own (title, categories, tags, brand) ...
      terms = _search_terms(ds)
      assert set(words) <= terms[ex.target[i]], (q, item)
      # ... and together they match the target and at least query_min_matches items: the query
      # is a search among many, never the target's name. Counted independently of the index.
      matching = np.ones(len(terms), bool)
      for w in words:
        matching &= _term_mask(ds, w)
      assert matching[ex.target[i]] and matching.sum() >= cfg["query_min_matches"], q
      assert (allowed == matching).all()
    elif ex.task == "discover":
      h = ex.history[i][ex.history[i] >= 0]
      assert (membership[ex.target[i]] & ~membership[h].any(axis=0)).any()
    elif ex.task == "holiday":
      name = list(pairs.HOLIDAYS)[ex.constraint[i]]
      assert 0 <= _holiday_gap(ex.timestamp[i], name) < cfg["holiday_days"]
      assert tasks.HOLIDAY_NAMES[ex.constraint[i]] in ex.instruction[i]
    elif ex.task == "season":
      month = datetime.datetime.fromtimestamp(int(ex.timestamp[i]), datetime.timezone.utc).month
      assert tasks.SEASON_NAMES[ex.constraint[i]] == tasks.SEASON_NAMES[(month % 12) // 3]
      assert tasks.SEASON_NAMES[ex.constraint[i]] in ex.instruction[i]
    elif ex.task == "category":
      assert names[ex.constraint[i]] in ex.instruction[i]
  # Whole-array rules.
  if ex.task == "category":
    assert membership[ex.target, ex.constraint].all()
    assert ex.constraint_names == names
  if ex.task == "longtail":
    assert tail[ex.target].all()
    assert all("less popular" in t for t in ex.instruction)
  if ex.task == "discover":
    assert all("something new" in t for t in ex.instruction)
  if ex.task == "season":
    assert (ex.constraint == pairs.season_of(ex.timestamp)).all()
  if ex.task == "holiday":
    assert (ex.constraint == pairs.holiday_of(ex.timestamp, cfg["holiday_days"])).all()
    assert (ex.constraint >= 0).all()
  assert ex.hard_constraint == (ex.task in ("query", "category"))
  assert ex.has_item_rule == (ex.task in ("query", "category", "longtail", "discover"))


def _check_no_leakage(ds: Dataset, built: dict):
  """No validation or test (user, position) is a training target of the same task."""
  lengths = np.array([len(u.items) for u in ds.raw.users])
  for task, ex in built["train"].items():
    assert (ex.position <= lengths[ex.user] - 3).all(), task
    train_keys = set(zip(ex.user.tolist(), ex.position.tolist()))
    for split, offset in (("validation", 2), ("test", 1)):
      ev = built[split].get(task)
      if ev is not None:
        assert (ev.position == lengths[ev.user] - offset).all()
        assert not train_keys & set(zip(ev.user.tolist(), ev.position.tolist())), (task, split)
      every_user = set(zip(range(len(lengths)), (lengths - offset).tolist()))
      assert not train_keys & every_user, (task, split)


def test_available_tasks(demo):
  names, reasons = tasks.available_tasks(demo)
  assert names == list(tasks.TASKS) and reasons == {}
  assert sorted(t for ts in tasks.FAMILIES.values() for t in ts) == sorted(tasks.TASKS)


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_every_example_obeys_its_rule(demo, demo_tasks, split):
  built = demo_tasks[split]
  assert list(built) == list(tasks.TASKS)
  for ex in built.values():
    assert len(ex) > 0, ex.task
    assert ex.split == split
    _check_examples(demo, ex, tasks.TASK_DEFAULTS)


def test_evaluation_rows_follow_the_splits(demo, demo_tasks):
  s = demo.splits
  for split, hist, target in (("validation", s.valid_hist, s.valid_target),
                              ("test", s.test_hist, s.test_target)):
    for t in ("justforyou", "category", "season"):  # tasks every user qualifies for
      ex = demo_tasks[split][t]
      assert (ex.user == s.users).all()
      assert (ex.history == hist).all() and (ex.target == target).all()
    # Longtail evaluates exactly the users whose target is in the tail.
    tail = tasks.tail_items(s, tasks.TASK_DEFAULTS["longtail_head_share"])
    assert (demo_tasks[split]["longtail"].user == s.users[tail[target]]).all()


def test_no_evaluation_target_is_a_training_target(demo, demo_tasks):
  _check_no_leakage(demo, demo_tasks)


def test_training_cap_and_positions(demo):
  cfg = {"max_train_per_user": 0}
  ex = tasks.build_tasks(demo, cfg, "train", tasks=["justforyou"])["justforyou"]
  # No cap: every position t >= 1 of every training sequence.
  assert len(ex) == sum(len(q) - 1 for q in demo.splits.train_seqs)
  capped = tasks.build_tasks(demo, {"max_train_per_user": 7}, "train")
  for t, e in capped.items():
    assert np.bincount(e.user).max() <= 7, t
  assert np.bincount(capped["justforyou"].user).min() == 7


def test_phrasings(demo_tasks):
  for t, ex in demo_tasks["train"].items():
    assert len(tasks.TEMPLATES[t]) >= 3
    assert len(set(ex.template.tolist())) >= 3, t
    # Templates filled with the same constraint still give distinct texts.
    assert len({tasks.TEMPLATES[t][j] for j in ex.template}) >= 3
  for t, ex in demo_tasks["test"].items():
    if t == "justforyou":
      continue
    cons = ex.constraint
    if t == "category":
      cons = [ex.constraint_names[c] for c in cons]
    elif t in ("season", "holiday"):
      cons = [ex.constraint_names[c] for c in cons]
    elif cons is None:
      continue
    assert all(str(c) in text for c, text in zip(cons, ex.instruction)), t
  assert len(tasks.all_template_texts()) == sum(len(v) for v in tasks.TEMPLATES.values())


def test_deterministic_with_seed(demo, demo_tasks):
  again = tasks.build_tasks(demo, {"phrasings_seed": 0}, "train")
  other = tasks.build_tasks(demo, {"phrasings_seed": 1}, "train")
  for t, ex in demo_tasks["train"].items():
    b = again[t]
    assert ex.instruction == b.instruction and (ex.user == b.user).all()
    assert (ex.position == b.position).all() and (ex.history == b.history).all()
    if isinstance(ex.constraint, list):
      assert ex.constraint == b.constraint
    elif ex.constraint is not None:
      assert (ex.constraint == b.constraint).all()
  assert demo_tasks["train"]["justforyou"].instruction != other["justforyou"].instruction
  # A split built alone is the same as built with the others.
  alone = tasks.build_tasks(demo, None, "test", tasks=["query"])["query"]
  assert alone.instruction == demo_tasks["test"]["query"].instruction


def test_categories(demo):
  names, membership = tasks.item_categories(demo)
  assert membership.shape == (len(demo.raw.items), len(names))
  # MovieLens: genres, several per item; "Toy Story" is in Animation and in Comedy.
  assert "Comedy" in names and membership.sum(axis=1).max() > 1
  toy = membership[0]
  assert toy[names.index("Animation")] and toy[names.index("Comedy")]
  primary = tasks.primary_category(demo)
  has = primary >= 0
  assert membership[np.flatnonzero(has), primary[has]].all()
  assert not membership[~has].any()
  # A category-constrained example's allowed set is exactly the category's members.
  ex = tasks.build_tasks(demo, None, "test", tasks=["category"])["category"]
  assert (ex.allowed(0) == membership[:, ex.constraint[0]]).all()
  sub = ex.subset([3, 1])
  assert (sub.allowed(0) == ex.allowed(3)).all() and sub.target[1] == ex.target[1]


def test_query_definition(demo):
  qi = tasks.query_index(demo)
  item = demo.raw.items[0]  # Toy Story (1995): Adventure|Animation|Children|Comedy|Fantasy
  own = tasks.item_search_terms(item)
  assert {"story", "animation", "comedy", "pixar"} <= own and "tags" not in own
  for seed in range(5):
    q = tasks.make_query(0, demo, 3, min_matches=50, seed=seed)
    assert q and set(q.split()) <= own and len(q.split()) <= 3
    mask = tasks.query_matches(q, demo)
    assert mask[0] and mask.sum() >= 50 and qi.count(q) == mask.sum()
    # Matching: every term is a searchable term of the item.
    for i in np.flatnonzero(mask):
      assert set(q.split()) <= tasks.item_search_terms(demo.raw.items[i])
  # Too narrow for any query: no term of Toy Story is shared by 2,000 items.
  assert tasks.make_query(0, demo, 3, min_matches=2000) == ""
  assert not qi.has_query(0, 1, 2000) and qi.has_query(0, 1, 50)
  assert not tasks.query_matches("story zzzzunknown", demo).any()
  assert tasks.query_matches("", demo).all()
  # More terms only narrow the match set.
  assert (qi.matches("story toy") <= qi.matches("story")).all()


def test_query_drops_targets_without_a_query(demo):
  """A target with no query of min_matches items gets no Query example; counted as dropped."""
  cfg = {"query_min_matches": 300}
  qi = tasks.query_index(demo)
  ex = tasks.build_tasks(demo, cfg, "test", tasks=["query"])["query"]
  has = np.array([qi.has_query(i, 1, 300) for i in range(len(demo.raw.items))])
  want = has[demo.splits.test_target]
  assert (~want).sum() > 0  # the threshold is high enough to drop some
  assert len(ex) == want.sum() and set(ex.user.tolist()) == set(
      np.asarray(demo.splits.users)[want].tolist())
  assert all(qi.count(q) >= 300 for q in ex.constraint)
  stats = tasks.task_counts(demo, cfg)["query"]
  assert stats["test"]["dropped"] == (~want).sum()
  assert stats["test"]["examples"] == len(ex) == stats["test"]["examples"]
  assert stats["test"]["matches_min"] >= 300


def test_tail_uses_training_popularity_only(demo):
  s = demo.splits
  share = 0.8
  tail = tasks.tail_items(s, share)
  pop = tasks.train_popularity(s)
  assert pop.sum() == sum(len(q) for q in s.train_seqs)
  assert pop[~tail].sum() >= share * pop.sum()
  assert pop[~tail].sum() - pop[~tail].min() < share * pop.sum()
  assert pop[tail].max() <= pop[~tail].min()
  # Evaluation targets do not move the threshold: only train_seqs are read.
  import dataclasses
  other = dataclasses.replace(s, valid_target=np.zeros_like(s.valid_target),
                              test_target=np.zeros_like(s.test_target))
  assert (tasks.tail_items(other, share) == tail).all()


def test_task_counts_and_config(demo):
  c = tasks.task_counts(demo, {"holiday_days": 7})
  assert set(c["counts"]) == set(tasks.TASKS) and c["unavailable"] == {}
  assert all(set(v) == set(tasks.SPLITS) for v in c["counts"].values())
  assert c["settings"]["holiday_days"] == 7
  assert c["counts"]["holiday"]["train"] < c["counts"]["justforyou"]["train"]
  for split in tasks.SPLITS:  # how narrow the queries are, per split
    q = c["query"][split]
    assert q["examples"] == c["counts"]["query"][split] and q["dropped"] >= 0
    assert q["matches_min"] >= c["settings"]["query_min_matches"] == 50
    assert q["matches_median"] >= q["matches_min"]
  with pytest.raises(ValueError, match="longtail_head_share"):
    tasks.build_tasks(demo, {"longtail_head_share": 1.5}, "test")
  with pytest.raises(ValueError, match="split"):
    tasks.build_tasks(demo, None, "dev")


@pytest.mark.slow
def test_beauty(data_root):
  ds = _dataset("beauty", os.path.join(data_root, raw.DEFAULT_SUBDIRS["beauty"]))
  names, reasons = tasks.available_tasks(ds)
  assert names == ["justforyou", "query", "category", "longtail", "discover"]
  assert set(reasons) == {"season", "holiday"}
  assert all("timestamp" in r for r in reasons.values())
  with pytest.raises(ValueError, match="not available"):
    tasks.build_tasks(ds, None, "test", tasks=["season"])
  cat_names, membership = tasks.item_categories(ds)
  assert (membership.sum(axis=1) == 1).all() and " > " in cat_names[0]
  built = {s: tasks.build_tasks(ds, None, s) for s in tasks.SPLITS}
  for split in tasks.SPLITS:
    assert list(built[split]) == names
    for ex in built[split].values():
      assert len(ex) > 0
      _check_examples(ds, ex, tasks.TASK_DEFAULTS, limit=300)
  _check_no_leakage(ds, built)
