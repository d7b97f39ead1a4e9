"""Parsers for the original public files of each dataset.

Every parser reads the files as published (see README.md for where), validates them completely
and returns a `RawDataset`. Bad input raises `DataError` naming the file, the line and the
problem; nothing is skipped silently. The TFDS builders (`builders.py`) call these parsers
*before* writing anything, so a bad file never leaves a partial dataset behind.
"""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import logging
import os
import re
from typing import Iterator

import numpy as np


class DataError(ValueError):
  """A problem in an original data file: says which file, which line and what is wrong."""

  def __init__(self, path: str, line: int | None, problem: str):
    where = f"{path}, line {line}" if line is not None else path
    super().__init__(f"{where}: {problem}")
    self.path, self.line, self.problem = path, line, problem


@dataclasses.dataclass
class Item:
  raw_id: str
  title: str
  category_path: list  # hierarchy, root first; genres for MovieLens (no hierarchy there)
  text: str  # the text used for grounding
  tags: list = dataclasses.field(default_factory=list)
  brand: str = ""


@dataclasses.dataclass
class User:
  raw_id: str
  items: np.ndarray  # [n] int64, 0-based item indices, chronological
  timestamps: np.ndarray | None = None  # [n] int64 unix seconds, when the data has them
  profile: str = ""  # no public dataset here carries profile fields; kept for the schema


@dataclasses.dataclass
class RawDataset:
  name: str
  items: list  # list[Item], position = item index
  users: list  # list[User], position = user index
  has_timestamps: bool
  format: str = ""  # the file format it was read from (a key of FORMATS)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(u.items) for u in self.users))

  def stats(self) -> dict:
    lengths = np.array([len(u.items) for u in self.users])
    return {
        "dataset": self.name,
        "num_users": len(self.users),
        "num_items": len(self.items),
        "num_interactions": self.num_interactions,
        "has_timestamps": self.has_timestamps,
        "sequence_length": {"min": int(lengths.min()), "mean": float(lengths.mean()),
                            "max": int(lengths.max())},
        "density": self.num_interactions / max(1, len(self.users) * len(self.items)),
        # Share of interactions whose item the user already had earlier in the sequence.
        "repeat_share": float(sum(len(u.items) - len(set(u.items)) for u in self.users)
                              / max(1, self.num_interactions)),
    }


# ---------------------------------------------------------------------------------------------
# Reading text files line by line with precise errors.


def _require(path: str) -> str:
  if not os.path.isfile(path):
    raise DataError(path, None, "file is missing (docs/DATASETS.md lists each format's files)")
  return path


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, text without the newline); non-UTF-8 bytes are an error."""
  with open(_require(path), "rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(path, n, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1})") from None
      yield n, text.rstrip("\r\n")


def _int(path: str, line: int, field: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DataError(path, line, f"{field} {value!r} is not an integer") from None


def _check_no_duplicate(path: str, line: int, seen: dict, key, what: str):
  if key in seen:
    raise DataError(path, line, f"duplicate {what} {key!r} (first on line {seen[key]})")
  seen[key] = line


# ---------------------------------------------------------------------------------------------
# Format amazon_p5 (Amazon 2014 Beauty as TIGER/P5 publish it): user_sequence.txt, item_meta.json


def parse_amazon_p5(manual_dir: str, name: str = "beauty") -> RawDataset:
  """``user_sequence.txt`` (``USER ITEM ITEM ...``) and ``item_meta.json`` (``{ITEM: {title,
  categories}}``) in ``manual_dir``."""
  seq_path = os.path.join(manual_dir, "user_sequence.txt")
  meta_path = _require(os.path.join(manual_dir, "item_meta.json"))
  with open(meta_path, "rb") as f:
    blob = f.read()
  try:
    meta = json.loads(blob.decode("utf-8"))
  except UnicodeDecodeError as e:
    line = blob[:e.start].count(b"\n") + 1
    raise DataError(meta_path, line, f"not valid UTF-8 (byte {blob[e.start]:#04x})") from None
  except json.JSONDecodeError as e:
    raise DataError(meta_path, e.lineno, f"malformed JSON ({e.msg}, column {e.colno})") from None
  if not isinstance(meta, dict) or not meta:
    raise DataError(meta_path, 1, "expected a non-empty JSON object {ASIN: {title, categories}}")

  items, index = [], {}
  for asin, m in meta.items():
    if not isinstance(m, dict) or not isinstance(m.get("title"), str):
      raise DataError(meta_path, None, f"item {asin!r} has no string 'title'")
    cats = m.get("categories")
    if (not isinstance(cats, list) or not cats or
        not all(isinstance(p, list) and p and all(isinstance(c, str) for c in p) for p in cats)):
      raise DataError(meta_path, None, f"item {asin!r}: 'categories' must be a non-empty list "
                      "of category paths (lists of strings)")
    title = html.unescape(m["title"]).strip()
    path = [html.unescape(c) for c in cats[0]]
    all_paths = [" > ".join(html.unescape(c) for c in p) for p in cats]
    index[asin] = len(items)
    items.append(Item(raw_id=asin, title=title, category_path=path,
                      text=f"{title}. {'; '.join(all_paths)}."))

  users, seen = [], {}
  for n, line in _lines(seq_path):
    if not line.strip():
      raise DataError(seq_path, n, "empty line (expected 'USER_ID ITEM ITEM ...')")
    parts = line.split()
    if len(parts) < 2:
      raise DataError(seq_path, n, f"user {parts[0]!r} has no items (truncated line?)")
    _check_no_duplicate(seq_path, n, seen, parts[0], "user")
    try:
      seq = np.array([index[a] for a in parts[1:]], dtype=np.int64)
    except KeyError as e:
      raise DataError(seq_path, n, f"item {e.args[0]!r} has no entry in item_meta.json") from None
    users.append(User(raw_id=parts[0], items=seq))
  if not users:
    raise DataError(seq_path, None, "no users")
  return RawDataset(name, items, users, has_timestamps=False, format="amazon_p5")


# ---------------------------------------------------------------------------------------------
# Format unisrec (Amazon 2018 Industrial & Scientific as UniSRec publishes it)


# UniSRec's text joins an item's category levels with spaces; Scientific's longest real path has
# 22 words. One item (B00MIK00CI) has its product description run into that field (128 words);
# a category that long would be a one-item category and a 300-token Category instruction, so a
# field over this many words is read as no category (the item's text is kept whole).
MAX_CATEGORY_WORDS = 40


def _split_scientific_text(text: str) -> tuple[str, str, str]:
  """'title. category path. brand. ' -> (title, category path, brand)."""
  body = text.strip()
  body = body[:-1] if body.endswith(".") else body
  anchor = body.rfind(". Industrial & Scientific")
  if anchor >= 0:
    title, rest = body[:anchor], body[anchor + 2:]
    cats, _, brand = rest.partition(". ")
    return title.strip(), cats.strip(), brand.strip()
  parts = body.rsplit(". ", 2)
  parts = [""] * (3 - len(parts)) + parts
  return parts[0].strip(), parts[1].strip(), parts[2].strip()


def _read_index(path: str) -> dict:
  out, seen = {}, {}
  for n, line in _lines(path):
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) != 2:
      raise DataError(path, n, f"expected 'RAW_ID<TAB>INDEX', got {len(parts)} field(s)")
    _check_no_duplicate(path, n, seen, parts[0], "id")
    out[parts[0]] = _int(path, n, "index", parts[1])
  if sorted(out.values()) != list(range(len(out))):
    raise DataError(path, None, "indices are not exactly 0..n-1")
  return out


def _read_inter(path: str, num_items: int, num_users: int) -> dict:
  """user index -> (history, target) for the one-row-per-user files."""
  rows = {}
  for n, line in _lines(path):
    if n == 1:
      if not line.startswith("user_id:token"):
        raise DataError(path, n, "missing header 'user_id:token\\titem_id_list:token_seq\\t"
                        "item_id:token'")
      continue
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) != 3:
      raise DataError(path, n, f"expected 3 tab-separated fields, got {len(parts)} (truncated "
                      "line?)")
    user = _int(path, n, "user index", parts[0])
    hist = [_int(path, n, "item index", x) for x in parts[1].split()]
    target = _int(path, n, "item index", parts[2])
    if not 0 <= user < num_users:
      raise DataError(path, n, f"unknown user index {user}")
    for it in hist + [target]:
      if not 0 <= it < num_items:
        raise DataError(path, n, f"item index {it} has no entry in the item table")
    if user in rows:
      raise DataError(path, n, f"duplicate row for user {user}")
    rows[user] = (hist, target)
  return rows


def _unisrec_prefix(manual_dir: str, name: str) -> str:
  """The ``<Category>`` of the ``<Category>.item2index`` in ``manual_dir``: the only one there,
  or the one whose name is ``name`` (case ignored)."""
  if not os.path.isdir(manual_dir):
    raise DataError(manual_dir, None, "directory is missing")
  found = sorted(f[:-len(".item2index")] for f in os.listdir(manual_dir)
                 if f.endswith(".item2index"))
  if len(found) == 1:
    return found[0]
  named = [f for f in found if f.lower() == name.lower()]
  if len(named) == 1:
    return named[0]
  if not found:
    raise DataError(os.path.join(manual_dir, "<Category>.item2index"), None,
                    "file is missing (format 'unisrec' needs <Category>.{text,item2index,"
                    "user2index,valid.inter,test.inter})")
  raise DataError(manual_dir, None, f"several UniSRec categories {found} and none is named "
                  f"{name!r} (dataset.name); keep one category per directory")


def parse_unisrec(manual_dir: str, name: str = "scientific") -> RawDataset:
  """``<Category>.{text,item2index,user2index,valid.inter,test.inter}`` in ``manual_dir``."""
  category = _unisrec_prefix(manual_dir, name)
  prefix = os.path.join(manual_dir, category)
  item2index = _read_index(prefix + ".item2index")
  user2index = _read_index(prefix + ".user2index")
  text_path = prefix + ".text"
  texts = {}
  for n, line in _lines(text_path):
    if n == 1:
      if not line.startswith("item_id:token"):
        raise DataError(text_path, n, "missing header 'item_id:token\\ttext:token_seq'")
      continue
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) != 2:
      raise DataError(text_path, n, f"expected 'ASIN<TAB>text', got {len(parts)} field(s)")
    if parts[0] not in item2index:
      raise DataError(text_path, n, f"item {parts[0]!r} is not in {category}.item2index")
    texts[parts[0]] = (n, parts[1])
  by_index = {v: k for k, v in item2index.items()}
  items = []
  for i in range(len(by_index)):
    asin = by_index[i]
    if asin not in texts:
      raise DataError(text_path, None, f"item {asin!r} (index {i}) has no text")
    text = html.unescape(texts[asin][1]).strip()
    title, cats, brand = _split_scientific_text(text)
    if len(cats.split()) > MAX_CATEGORY_WORDS:
      logging.warning("%s line %d: item %r's category field has %d words (more than %d), "
                      "read as no category", text_path, texts[asin][0], asin,
                      len(cats.split()), MAX_CATEGORY_WORDS)
      cats = ""
    items.append(Item(raw_id=asin, title=title, category_path=[cats] if cats else [],
                      text=text, brand=brand))

  test = _read_inter(prefix + ".test.inter", len(items), len(user2index))
  valid = _read_inter(prefix + ".valid.inter", len(items), len(user2index))
  users_by_index = {v: k for k, v in user2index.items()}
  users = []
  for u in range(len(users_by_index)):
    if u not in test:
      raise DataError(prefix + ".test.inter", None, f"user index {u} has no test row")
    hist, target = test[u]
    # The valid file must agree with the test file: its target is the test history's last item.
    if u in valid and (not hist or valid[u][1] != hist[-1]):
      raise DataError(prefix + ".valid.inter", None,
                      f"user index {u}: validation target disagrees with the test history")
    users.append(User(raw_id=users_by_index[u], items=np.array(hist + [target], np.int64)))
  return RawDataset(name, items, users, has_timestamps=False, format="unisrec")


# ---------------------------------------------------------------------------------------------
# Format movielens (GroupLens' ratings.csv, movies.csv, tags.csv; header rows optional)


def _csv_rows(path: str, header: str) -> Iterator[tuple[int, list]]:
  """Yields (line number, fields); a first line equal to ``header`` is skipped, and any other
  first line whose first field is not an integer is an error (a header of the wrong file)."""
  for n, line in _lines(path):
    if n == 1:
      line = line.lstrip("\ufeff")
      if line.strip() == header:
        continue
      first = line.split(",", 1)[0].strip()
      if line.strip() and not first.lstrip("-").isdigit():
        raise DataError(path, n, f"expected the header {header!r} or a data row, got "
                        f"{line[:60]!r}")
    if not line.strip():
      raise DataError(path, n, "empty line")
    try:
      row = next(csv.reader(io.StringIO(line), strict=True))
    except csv.Error as e:
      raise DataError(path, n, f"malformed CSV ({e})") from None
    yield n, row


def parse_movielens(manual_dir: str, name: str = "movielens") -> RawDataset:
  """``ratings.csv``, ``movies.csv`` and ``tags.csv`` in ``manual_dir``, each with or without
  GroupLens' header row."""
  movies_path = os.path.join(manual_dir, "movies.csv")
  ratings_path = os.path.join(manual_dir, "ratings.csv")
  tags_path = os.path.join(manual_dir, "tags.csv")

  movies, seen = {}, {}
  for n, row in _csv_rows(movies_path, "movieId,title,genres"):
    if len(row) != 3:
      raise DataError(movies_path, n, f"expected 3 fields movieId,title,genres, got {len(row)} "
                      "(truncated line or unquoted comma?)")
    mid = _int(movies_path, n, "movieId", row[0])
    _check_no_duplicate(movies_path, n, seen, mid, "movieId")
    genres = [] if row[2] == "(no genres listed)" else row[2].split("|")
    movies[mid] = (row[1].strip(), genres)

  events, seen = {}, {}
  for n, row in _csv_rows(ratings_path, "userId,movieId,rating,timestamp"):
    if len(row) != 4:
      raise DataError(ratings_path, n, f"expected 4 fields userId,movieId,rating,timestamp, got "
                      f"{len(row)} (truncated line?)")
    uid = _int(ratings_path, n, "userId", row[0])
    mid = _int(ratings_path, n, "movieId", row[1])
    try:
      float(row[2])
    except ValueError:
      raise DataError(ratings_path, n, f"rating {row[2]!r} is not a number") from None
    ts = _int(ratings_path, n, "timestamp", row[3])
    if mid not in movies:
      raise DataError(ratings_path, n, f"movieId {mid} has no entry in movies.csv")
    _check_no_duplicate(ratings_path, n, seen, (uid, mid), "rating of (userId, movieId)")
    events.setdefault(uid, []).append((ts, mid))

  tags = {}
  for n, row in _csv_rows(tags_path, "userId,movieId,tag,timestamp"):
    if len(row) != 4:
      raise DataError(tags_path, n, f"expected 4 fields userId,movieId,tag,timestamp, got "
                      f"{len(row)}")
    mid = _int(tags_path, n, "movieId", row[1])
    _int(tags_path, n, "timestamp", row[3])
    if mid not in movies:
      raise DataError(tags_path, n, f"movieId {mid} has no entry in movies.csv")
    tag = row[2].strip().lower()
    if tag and tag not in tags.setdefault(mid, []):
      tags[mid].append(tag)

  # Items: every movie that has at least one rating, in movieId order.
  rated = sorted({mid for evs in events.values() for _, mid in evs})
  index = {mid: i for i, mid in enumerate(rated)}
  items = []
  for mid in rated:
    title, genres = movies[mid]
    tag_list = tags.get(mid, [])
    text = f"{title}. {', '.join(genres) if genres else 'no genre'}."
    if tag_list:
      text += f" Tags: {', '.join(tag_list[:10])}."
    items.append(Item(raw_id=str(mid), title=title, category_path=genres, text=text,
                      tags=tag_list))
  users = []
  for uid in sorted(events):
    # Time order; ties (same second) broken by movieId so the order is deterministic.
    evs = sorted(events[uid])
    users.append(User(raw_id=str(uid), items=np.array([index[m] for _, m in evs], np.int64),
                      timestamps=np.array([t for t, _ in evs], np.int64)))
  if not users:
    raise DataError(ratings_path, None, "no ratings")
  return RawDataset(name, items, users, has_timestamps=True, format="movielens")


# File format -> parser(manual_dir, name) -> RawDataset. A new format is one parser here.
FORMATS = {
    "amazon_p5": parse_amazon_p5,
    "unisrec": parse_unisrec,
    "movielens": parse_movielens,
}

# The datasets the configs know: each name implies its format (config.dataset.format may stay
# empty) and, under $SIGMA_DATA_DIR, where its files are (the layout of ../shared/data).
KNOWN_FORMATS = {
    "beauty": "amazon_p5",
    "scientific": "unisrec",
    "movielens": "movielens",
    "demo": "movielens",
}
DEFAULT_SUBDIRS = {
    "beauty": "amazon2014/Beauty",
    "scientific": "amazon2018/Scientific",
    "movielens": "ml-latest-small",
}
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")

# A dataset name names files (the TFDS directory sigma_<name>, docs/results/<name>.json).
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_name(name: str) -> str:
  """``name`` if it can name a dataset (lower-case letters, digits, '_'; a letter first)."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"dataset.name={name!r} is not a valid dataset name: use lower-case "
                     "letters, digits and '_', starting with a letter (e.g. 'my_category')")
  return name


def resolve_format(name: str, fmt: str = "") -> str:
  """The file format of dataset ``name``: ``fmt``, or for a known name the one it implies."""
  check_name(name)
  known = KNOWN_FORMATS.get(name)
  if not fmt:
    if known is None:
      raise ValueError(f"unknown dataset {name!r} (dataset.name) and no dataset.format: set "
                       f"dataset.format to one of {sorted(FORMATS)}, or use a known name "
                       f"{sorted(KNOWN_FORMATS)}")
    return known
  if fmt not in FORMATS:
    raise ValueError(f"dataset.format={fmt!r} is not a known file format; choose from "
                     f"{sorted(FORMATS)} (docs/DATASETS.md)")
  if known is not None and fmt != known:
    raise ValueError(f"dataset.name={name!r} is the known dataset in format {known!r}, but "
                     f"dataset.format={fmt!r}; give data in another format another name")
  return fmt


def resolve_manual_dir(name: str, manual_dir: str = "") -> str:
  """The directory holding a dataset's original files."""
  if manual_dir:
    return manual_dir
  if name == "demo":
    return DEMO_DIR
  if name not in DEFAULT_SUBDIRS:
    raise ValueError(f"dataset {name!r} (dataset.name) is not one of the known datasets "
                     f"{sorted(KNOWN_FORMATS)}: set dataset.manual_dir to the directory that "
                     "holds its files (docs/DATASETS.md)")
  root = os.environ.get("SIGMA_DATA_DIR")
  if not root:
    raise ValueError(f"dataset {name!r}: set config.dataset.manual_dir, or SIGMA_DATA_DIR to the "
                     "directory that holds the original files (docs/DATASETS.md)")
  return os.path.join(root, DEFAULT_SUBDIRS[name])


def parse(name: str, manual_dir: str = "", fmt: str = "") -> RawDataset:
  """Parses dataset ``name`` (format ``fmt``, or the one a known name implies)."""
  fmt = resolve_format(name, fmt)
  return FORMATS[fmt](resolve_manual_dir(name, manual_dir), name)
