"""Data: exact statistics of the real datasets, leave-one-out, batch order, bad input."""
import os
import shutil

import numpy as np
import pytest

from sigma_jax.data import builders, loader, raw, splits

EXPECTED = {  # users, items, interactions (DESIGN §3, ../shared/data/README.md)
    "beauty": (22363, 12101, 198502),
    "scientific": (8442, 4385, 59384),
    "movielens": (706, 8552, 100023),
}


@pytest.fixture(scope="module")
def built(data_root, tmp_path_factory):
  """All three real datasets built once into one TFDS directory and read back."""
  directory = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for name in EXPECTED:
    manual = os.path.join(data_root, raw.DEFAULT_SUBDIRS[name])
    builders.build(name, directory, manual)
    out[name] = builders.load(name, directory)
  return directory, out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statistics_exact(built, name):
  data = built[1][name]
  stats = data.stats()
  assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == EXPECTED[name]


def test_arrays_are_array_record(built):
  directory, _ = built
  files = [f for _, _, fs in os.walk(directory) for f in fs]
  assert any(".array_record-" in f for f in files)
  assert not any(".tfrecord" in f for f in files)


def test_beauty_titles_unescaped_and_paths_kept(built, data_root):
  data = built[1]["beauty"]
  titles = [it.title for it in data.items]
  assert not any("&amp;" in t for t in titles)
  assert any("Crabtree & Evelyn" in t for t in titles)
  assert all(it.category_path[0] == "Beauty" and len(it.category_path) >= 2 for it in data.items)
  # Sequence order is the file's order: the first user's first item is the file's first ASIN.
  with open(os.path.join(data_root, "amazon2014/Beauty/user_sequence.txt")) as f:
    first = f.readline().split()
  assert data.users[0].raw_id == first[0]
  assert [data.items[i].raw_id for i in data.users[0].items] == first[1:]


def test_scientific_text_fields(built):
  data = built[1]["scientific"]
  it = data.items[0]
  assert it.raw_id == "B00TNNWMXI"
  assert it.brand == "eSUN"
  assert it.category_path[0].startswith("Industrial & Scientific")
  assert it.title.startswith("eSUN Bronze filament")


def test_movielens_time_order_and_ties(built, data_root):
  data = built[1]["movielens"]
  assert data.has_timestamps
  for u in data.users:
    assert np.all(np.diff(u.timestamps) >= 0)
    ties = np.diff(u.timestamps) == 0
    # Ties broken by movieId, ascending.
    mids = np.array([int(data.items[i].raw_id) for i in u.items])
    assert np.all(np.diff(mids)[ties] > 0)
  # Quoted titles with commas survive.
  assert any(it.title == "American President, The (1995)" for it in data.items)
  assert any(it.tags for it in data.items)


def test_leave_one_out_by_hand():
  s = splits.leave_one_out([7, 8], [np.array([0, 1, 2, 3]), np.array([4, 2, 1])], num_items=5,
                           max_history=2)
  assert s.test_target.tolist() == [3, 1]
  assert s.valid_target.tolist() == [2, 2]
  assert s.test_hist.tolist() == [[1, 2], [4, 2]]
  assert s.valid_hist.tolist() == [[0, 1], [-1, 4]]
  assert [t.tolist() for t in s.train_seqs] == [[0, 1], [4]]
  with pytest.raises(ValueError, match="user 9 has 2 interactions"):
    splits.leave_one_out([9], [np.array([0, 1])], num_items=5)


def test_leave_one_out_real_counts(built):
  data = built[1]["beauty"]
  s = splits.leave_one_out(range(len(data.users)), [u.items for u in data.users],
                           len(data.items), 20)
  assert s.counts()["test"]["interactions"] == 22363
  assert s.counts()["train"]["interactions"] == 198502 - 2 * 22363
  assert s.test_hist.shape == (22363, 20)
  # The validation target is the newest item of the test history.
  np.testing.assert_array_equal(s.test_hist[:, -1], s.valid_target)


def test_batches_deterministic_resumable_and_host_sharded():
  ds = loader.index_batches(num_records=10, global_batch=4, seed=3)
  again = loader.index_batches(num_records=10, global_batch=4, seed=3)
  first = [ds[i] for i in range(6)]
  # Position is (seed, step): a fresh iterator started at step 4 sees the same batches.
  np.testing.assert_array_equal(again[4], first[4])
  # Each epoch is a permutation of all records.
  flat = np.concatenate(first)[:10]
  assert sorted(flat.tolist()) == list(range(10))
  assert not np.array_equal(loader.index_batches(10, 4, seed=4)[0], first[0])
  parts = [loader.host_slice(first[2], p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), first[2])
  with pytest.raises(ValueError, match="not divisible"):
    loader.host_slice(first[2], 0, 3)


# ---------------------------------------------------------------------------------------------
# Bad input: each stops the builder with file, line and problem, and leaves nothing behind.


def _copy(src, dst):
  shutil.copytree(src, dst)
  for root, _, files in os.walk(dst):
    for f in files:
      os.chmod(os.path.join(root, f), 0o644)
  return dst


def _edit(path, fn):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(fn(data))


def _replace_line(n, new):
  def fn(data):
    lines = data.split(b"\n")
    lines[n - 1] = new
    return b"\n".join(lines)
  return fn


def _expect_build_error(tmp_path, name, manual, pattern):
  out = str(tmp_path / "tfds")
  with pytest.raises(raw.DataError, match=pattern):
    builders.build(name, out, manual)
  left = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs] if os.path.exists(out) else []
  assert not left, f"partial dataset left behind: {left}"


@pytest.fixture
def ml_copy(tmp_path):
  return _copy(raw.DEMO_DIR, str(tmp_path / "ml"))


def test_truncated_ratings_line(tmp_path, ml_copy):
  _edit(os.path.join(ml_copy, "ratings.csv"), _replace_line(5, b"1,6,2.0"))
  _expect_build_error(tmp_path, "movielens", ml_copy,
                      r"ratings\.csv, line 5: expected 4 fields .* got 3 \(truncated line\?\)")


def test_non_numeric_timestamp(tmp_path, ml_copy):
  _edit(os.path.join(ml_copy, "ratings.csv"), _replace_line(7, b"1,6,2.0,yesterday"))
  _expect_build_error(tmp_path, "movielens", ml_copy,
                      r"ratings\.csv, line 7: timestamp 'yesterday' is not an integer")


def test_rating_of_unknown_movie(tmp_path, ml_copy):
  _edit(os.path.join(ml_copy, "ratings.csv"), _replace_line(3, b"1,99999999,2.0,980730861"))
  _expect_build_error(tmp_path, "movielens", ml_copy,
                      r"ratings\.csv, line 3: movieId 99999999 has no entry in movies\.csv")


def test_duplicated_rating_line(tmp_path, ml_copy):
  def dup(data):
    lines = data.split(b"\n")
    return b"\n".join(lines[:10] + [lines[9]] + lines[10:])
  _edit(os.path.join(ml_copy, "ratings.csv"), dup)
  _expect_build_error(tmp_path, "movielens", ml_copy,
                      r"ratings\.csv, line 11: duplicate rating .* \(first on line 10\)")


def test_non_utf8_byte(tmp_path, ml_copy):
  _edit(os.path.join(ml_copy, "movies.csv"), _replace_line(4, b"4,Caf\xe9 (1995),Drama"))
  _expect_build_error(tmp_path, "movielens", ml_copy,
                      r"movies\.csv, line 4: not valid UTF-8 \(byte 0xe9 at column 6\)")


def test_missing_file(tmp_path, ml_copy):
  os.remove(os.path.join(ml_copy, "tags.csv"))
  _expect_build_error(tmp_path, "movielens", ml_copy, r"tags\.csv: file is missing")


def _tiny_beauty(tmp_path, seq_lines, meta=None):
  d = tmp_path / "beauty"
  d.mkdir()
  meta = meta if meta is not None else (
      '{"A1": {"title": "Soap &amp; Co", "categories": [["Beauty", "Bath"]]}, '
      '"A2": {"title": "Gel", "categories": [["Beauty", "Hair"]]}, '
      '"A3": {"title": "Cream", "categories": [["Beauty", "Skin Care", "Face"]]}}')
  (d / "item_meta.json").write_text(meta)
  (d / "user_sequence.txt").write_bytes(b"\n".join(seq_lines) + b"\n")
  return str(d)


def test_beauty_tiny_builds(tmp_path):
  manual = _tiny_beauty(tmp_path, [b"U1 A1 A2 A3", b"U2 A3 A2 A1 A2"])
  builders.build("beauty", str(tmp_path / "tfds"), manual)
  data = builders.load("beauty", str(tmp_path / "tfds"))
  assert data.items[0].title == "Soap & Co"
  assert [u.items.tolist() for u in data.users] == [[0, 1, 2], [2, 1, 0, 1]]


def test_beauty_item_without_metadata(tmp_path):
  manual = _tiny_beauty(tmp_path, [b"U1 A1 A2 A3", b"U2 A3 B9 A1"])
  _expect_build_error(tmp_path, "beauty", manual,
                      r"user_sequence\.txt, line 2: item 'B9' has no entry in item_meta\.json")


def test_beauty_user_without_items(tmp_path):
  manual = _tiny_beauty(tmp_path, [b"U1 A1 A2 A3", b"U2"])
  _expect_build_error(tmp_path, "beauty", manual,
                      r"user_sequence\.txt, line 2: user 'U2' has no items")


def test_beauty_duplicated_user_line(tmp_path):
  manual = _tiny_beauty(tmp_path, [b"U1 A1 A2 A3", b"U1 A1 A2 A3"])
  _expect_build_error(tmp_path, "beauty", manual,
                      r"user_sequence\.txt, line 2: duplicate user 'U1' \(first on line 1\)")


def test_beauty_truncated_json(tmp_path):
  manual = _tiny_beauty(tmp_path, [b"U1 A1 A2 A3"], meta='{"A1": {"title": "Soap", "categ')
  _expect_build_error(tmp_path, "beauty", manual, r"item_meta\.json, line 1: malformed JSON")


def test_scientific_truncated_inter_line(tmp_path, data_root):
  manual = _copy(os.path.join(data_root, "amazon2018/Scientific"), str(tmp_path / "sci"))
  _edit(os.path.join(manual, "Scientific.test.inter"), _replace_line(3, b"1\t14 15 16"))
  _expect_build_error(tmp_path, "scientific", manual,
                      r"Scientific\.test\.inter, line 3: expected 3 tab-separated fields, got 2")


def test_unknown_dataset_and_missing_data_dir(monkeypatch):
  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    raw.parse("nope")
  monkeypatch.delenv("SIGMA_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="SIGMA_DATA_DIR"):
    raw.resolve_manual_dir("beauty")
