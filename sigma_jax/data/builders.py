"""TFDS dataset builders: original files -> array_record, read back without TensorFlow.

Each dataset is one builder with two splits (a builder class per dataset name, made by
``builder_class``; its TFDS directory is ``sigma_<name>``):
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

# Per file format (a key of raw.FORMATS): where the original data come from (optional).
_HOMEPAGES = {
    "amazon_p5": "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
    "unisrec": "https://nijianmo.github.io/amazon/index.html",
    "movielens": "https://grouplens.org/datasets/movielens/",
}

_INSTRUCTIONS = {
    "amazon_p5": "Amazon 2014 5-core category as preprocessed by P5/TIGER: put "
                 "user_sequence.txt and item_meta.json in the manual directory.",
    "unisrec": "Amazon 2018 category as preprocessed by UniSRec: put "
               "<Category>.{text,item2index,user2index,train.inter,valid.inter,test.inter} in "
               "the manual directory.",
    "movielens": "MovieLens (GroupLens): put ratings.csv, movies.csv and tags.csv (header rows "
                 "optional) in the manual directory.",
}


class _SigmaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body; ``builder_class`` makes one subclass per dataset (``DATASET``, ``FORMAT``)."""

  DATASET = ""
  FORMAT = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, parsed: raw.RawDataset | None = None, **kwargs):
    self._parsed = parsed
    super().__init__(**kwargs)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # noqa: N802 (TFDS's name)
    return _INSTRUCTIONS.get(self.FORMAT, f"Put the files of format {self.FORMAT!r} in the "
                             "manual directory (docs/DATASETS.md).")

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
        homepage=_HOMEPAGES.get(self.FORMAT, ""),
        disable_shuffling=True,  # records stay in index order
        metadata=tfds.core.MetadataDict(stats=stats),
    )

  def _split_generators(self, dl_manager):
    if self._parsed is None:
      self._parsed = raw.parse(self.DATASET, str(dl_manager.manual_dir), self.FORMAT)
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


_CLASSES = {}


def builder_class(name: str, fmt: str = ""):
  """The builder class of dataset ``name`` in file format ``fmt`` (empty: the one a known name
  implies). Its TFDS name, ``sigma_<name>``, is its directory under the TFDS data dir."""
  fmt = raw.resolve_format(name, fmt)
  if (name, fmt) not in _CLASSES:
    class_name = "Sigma" + "".join(p.capitalize() for p in name.split("_"))
    _CLASSES[name, fmt] = type(class_name, (_SigmaBuilder,),
                               {"name": f"sigma_{name}", "DATASET": name, "FORMAT": fmt,
                                "__module__": __name__}, skip_registration=True)
  return _CLASSES[name, fmt]


def build(name: str, tfds_dir: str, manual_dir: str = "",
          fmt: str = "") -> tfds.core.DatasetBuilder:
  """Parses the original files, then writes the array_record dataset under ``tfds_dir``.

  ``fmt`` is the file format (``raw.FORMATS``; empty for a known name). A dataset already built
  there is reused. On any error nothing is left under ``tfds_dir``.
  """
  cls = builder_class(name, fmt)
  existing = cls(data_dir=tfds_dir, file_format="array_record")
  if existing.is_prepared():
    return existing
  manual_dir = raw.resolve_manual_dir(name, manual_dir)
  parsed = raw.parse(name, manual_dir, cls.FORMAT)  # raises DataError before anything is written
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


def load(name: str, tfds_dir: str, fmt: str = "") -> raw.RawDataset:
  """Reads a built dataset back through ``as_data_source()`` (no TensorFlow)."""
  builder = builder_class(name, fmt)(data_dir=tfds_dir, file_format="array_record")
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
  return raw.RawDataset(name, items, users, has_timestamps=has_ts, format=builder.FORMAT)
