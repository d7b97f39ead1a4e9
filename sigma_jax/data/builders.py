"""TFDS dataset builders: original files -> array_record, read back without TensorFlow.

Each dataset is one builder with two splits:
- ``users``: one record per user — index, raw id, chronological item indices, timestamps (empty
  when the data has none) and profile text (empty: none of the public datasets has profiles);
- ``items``: one record per item — index, raw id, title, category path, tags, brand and the text
  used for grounding.
Statistics go into the dataset's metadata. Reading uses ``builder.as_data_source()``.

The original files are parsed and validated in full (``raw.py``) before TFDS writes anything,
and TFDS writes into a temporary directory that it renames at the end, so bad input leaves no
dataset behind.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from sigma_jax.data import raw

_HOMEPAGES = {
    "beauty": "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
    "scientific": "https://nijianmo.github.io/amazon/index.html",
    "movielens": "https://grouplens.org/datasets/movielens/",
}

_INSTRUCTIONS = {
    "beauty": "Amazon 2014 'Beauty' 5-core as preprocessed by P5/TIGER: put user_sequence.txt "
              "and item_meta.json in the manual directory.",
    "scientific": "Amazon 2018 'Industrial and Scientific' as preprocessed by UniSRec: put "
                  "Scientific.{text,item2index,user2index,train.inter,valid.inter,test.inter} "
                  "in the manual directory.",
    "movielens": "MovieLens latest-small (GroupLens): put ratings.csv and movies.csv (both "
                 "without header rows) and tags.csv in the manual directory.",
}


class _SigmaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body; subclasses set ``DATASET`` (a key of ``raw.PARSERS``)."""

  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, parsed: raw.RawDataset | None = None, **kwargs):
    self._parsed = parsed
    super().__init__(**kwargs)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # noqa: N802 (TFDS's name)
    return _INSTRUCTIONS.get(self.DATASET, _INSTRUCTIONS["movielens"])

  def _info(self) -> tfds.core.DatasetInfo:
    stats = self._parsed.stats() if self._parsed is not None else {}
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"sigma_jax {self.DATASET}: per-user chronological item sequences and the "
                    "item table.",
        features=tfds.features.FeaturesDict({
            "users": tfds.features.FeaturesDict({
                "user_index": np.int64,
                "raw_id": tfds.features.Text(),
                "items": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "profile": tfds.features.Text(),
            }),
            "items": tfds.features.FeaturesDict({
                "item_index": np.int64,
                "raw_id": tfds.features.Text(),
                "title": tfds.features.Text(),
                "category_path": tfds.features.Sequence(tfds.features.Text()),
                "tags": tfds.features.Sequence(tfds.features.Text()),
                "brand": tfds.features.Text(),
                "text": tfds.features.Text(),
            }),
        }),
        homepage=_HOMEPAGES.get(self.DATASET, _HOMEPAGES["movielens"]),
        disable_shuffling=True,  # records stay in index order
        metadata=tfds.core.MetadataDict(stats=stats),
    )

  def _split_generators(self, dl_manager):
    if self._parsed is None:
      self._parsed = raw.parse(self.DATASET, str(dl_manager.manual_dir))
    return {"users": self._generate_examples("users"), "items": self._generate_examples("items")}

  def _generate_examples(self, split):
    # A single feature dict with both record kinds would waste space; each split fills its own
    # half and leaves the other half empty.
    empty_user = {"user_index": -1, "raw_id": "", "items": np.zeros([0], np.int64),
                  "timestamps": np.zeros([0], np.int64), "profile": ""}
    empty_item = {"item_index": -1, "raw_id": "", "title": "", "category_path": [], "tags": [],
                  "brand": "", "text": ""}
    if split == "users":
      for i, u in enumerate(self._parsed.users):
        ts = u.timestamps if u.timestamps is not None else np.zeros([0], np.int64)
        yield i, {"users": {"user_index": i, "raw_id": u.raw_id, "items": u.items,
                            "timestamps": ts, "profile": u.profile}, "items": empty_item}
    else:
      for i, it in enumerate(self._parsed.items):
        yield i, {"items": {"item_index": i, "raw_id": it.raw_id, "title": it.title,
                            "category_path": it.category_path, "tags": it.tags,
                            "brand": it.brand, "text": it.text}, "users": empty_user}


class SigmaBeauty(_SigmaBuilder, skip_registration=True):
  name = "sigma_beauty"
  DATASET = "beauty"


class SigmaScientific(_SigmaBuilder, skip_registration=True):
  name = "sigma_scientific"
  DATASET = "scientific"


class SigmaMovielens(_SigmaBuilder, skip_registration=True):
  name = "sigma_movielens"
  DATASET = "movielens"


class SigmaDemo(_SigmaBuilder, skip_registration=True):
  name = "sigma_demo"
  DATASET = "demo"


BUILDERS = {b.DATASET: b for b in (SigmaBeauty, SigmaScientific, SigmaMovielens, SigmaDemo)}


def _builder_class(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(BUILDERS)}")
  return BUILDERS[name]


def build(name: str, tfds_dir: str, manual_dir: str = "") -> tfds.core.DatasetBuilder:
  """Parses the original files, then writes the array_record dataset under ``tfds_dir``.

  A dataset already built there is reused. On any error nothing is left under ``tfds_dir``.
  """
  cls = _builder_class(name)
  existing = cls(data_dir=tfds_dir, file_format="array_record")
  if existing.is_prepared():
    return existing
  manual_dir = raw.resolve_manual_dir(name, manual_dir)
  parsed = raw.parse(name, manual_dir)  # raises DataError before anything is written
  builder = cls(data_dir=tfds_dir, file_format="array_record", parsed=parsed)
  target = os.path.join(tfds_dir, cls.name)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except BaseException:
    shutil.rmtree(target, ignore_errors=True)
    raise
  return cls(data_dir=tfds_dir, file_format="array_record")


def _text(b) -> str:
  return b.decode("utf-8") if isinstance(b, bytes) else str(b)


def load(name: str, tfds_dir: str) -> raw.RawDataset:
  """Reads a built dataset back through ``as_data_source()`` (no TensorFlow)."""
  builder = _builder_class(name)(data_dir=tfds_dir, file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(f"dataset {name!r} is not built under {tfds_dir}; run the 'data' "
                            "stage first")
  source = builder.as_data_source()
  items = []
  # One batched read per split: several times faster than record-by-record indexing.
  for k, rec in enumerate(source["items"].__getitems__(range(len(source["items"])))):
    r = rec["items"]
    if int(r["item_index"]) != k:
      raise ValueError(f"{builder.data_dir}: item record {k} has index {r['item_index']}")
    items.append(raw.Item(raw_id=_text(r["raw_id"]), title=_text(r["title"]),
                          category_path=[_text(c) for c in r["category_path"]],
                          text=_text(r["text"]), tags=[_text(t) for t in r["tags"]],
                          brand=_text(r["brand"])))
  users = []
  has_ts = False
  for k, rec in enumerate(source["users"].__getitems__(range(len(source["users"])))):
    r = rec["users"]
    if int(r["user_index"]) != k:
      raise ValueError(f"{builder.data_dir}: user record {k} has index {r['user_index']}")
    ts = np.asarray(r["timestamps"], np.int64)
    has_ts = has_ts or len(ts) > 0
    users.append(raw.User(raw_id=_text(r["raw_id"]), items=np.asarray(r["items"], np.int64),
                          timestamps=ts if len(ts) else None, profile=_text(r["profile"])))
  return raw.RawDataset(name, items, users, has_timestamps=has_ts)
