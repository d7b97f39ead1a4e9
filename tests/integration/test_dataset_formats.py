"""Datasets by file format (docs/DATASETS.md): official MovieLens files with or without their
header rows, and an Amazon category of one's own under a new dataset name."""
import json
import os
import shutil

import pytest

from configs import demo
from sigma_jax import pipeline, utils, workdir as wd
from sigma_jax.data import builders, raw, tasks

_ML_HEADERS = {"ratings.csv": "userId,movieId,rating,timestamp",
               "movies.csv": "movieId,title,genres",
               "tags.csv": "userId,movieId,tag,timestamp"}


def _ml_sample(data_root, directory, users=8, headers=True):
  """The first ``users`` users of ml-latest-small (the rated movies' rows only)."""
  src = os.path.join(data_root, raw.DEFAULT_SUBDIRS["movielens"])
  with open(os.path.join(src, "ratings.csv"), encoding="utf-8") as f:
    ratings = [line for line in f.read().splitlines() if int(line.split(",", 1)[0]) <= users]
  movie_ids = {line.split(",")[1] for line in ratings}
  with open(os.path.join(src, "movies.csv"), encoding="utf-8") as f:
    movies = [line for line in f.read().splitlines() if line.split(",", 1)[0] in movie_ids]
  with open(os.path.join(src, "tags.csv"), encoding="utf-8") as f:
    tags = [line for line in f.read().splitlines()[1:] if line.split(",")[1] in movie_ids]
  os.makedirs(directory)
  for name, lines in (("ratings.csv", ratings), ("movies.csv", movies), ("tags.csv", tags)):
    head = [_ML_HEADERS[name]] if headers else []
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.write("\n".join(head + lines) + "\n")
  return directory


def _records(data):
  return ([(it.raw_id, it.title, it.category_path, it.tags, it.text) for it in data.items],
          [(u.raw_id, u.items.tolist(), u.timestamps.tolist()) for u in data.users])


def test_movielens_with_and_without_header_rows(tmp_path, data_root):
  with_headers = _ml_sample(data_root, str(tmp_path / "official"), headers=True)
  without = _ml_sample(data_root, str(tmp_path / "plain"), headers=False)
  first = open(os.path.join(with_headers, "ratings.csv"), encoding="utf-8").readline()
  assert first.strip() == "userId,movieId,rating,timestamp"
  builders.build("movielens", str(tmp_path / "a"), with_headers)
  a = builders.load("movielens", str(tmp_path / "a"))
  builders.build("movielens", str(tmp_path / "b"), without)
  b = builders.load("movielens", str(tmp_path / "b"))
  assert _records(a) == _records(b)
  assert len(a.users) == 8 and len(a.items) > 100
  # Titles with a comma are quoted in movies.csv and come back whole.
  assert any("," in it.title for it in a.items)
  assert all(it.category_path or it.title for it in a.items)


def test_movielens_files_under_a_new_name_keep_their_genres(tmp_path, data_root):
  """Genres are categories by format, not by name: a new name reads them the same way."""
  d = _ml_sample(data_root, str(tmp_path / "ml"))
  mine, known = raw.parse("my_movies", d, "movielens"), raw.parse("movielens", d)
  assert mine.name == "my_movies" and mine.format == "movielens"
  assert (tasks.primary_category(mine) == tasks.primary_category(known)).all()
  assert len(tasks.item_categories(mine)[0]) < 30  # genres, not 'A > B' paths


def test_movielens_wrong_header_is_named(tmp_path, data_root):
  d = _ml_sample(data_root, str(tmp_path / "ml"), headers=False)
  path = os.path.join(d, "movies.csv")
  body = open(path, encoding="utf-8").read()
  with open(path, "w", encoding="utf-8") as f:
    f.write("movie,title,genres\n" + body)
  with pytest.raises(raw.DataError, match=r"movies\.csv, line 1: expected the header "
                     r"'movieId,title,genres' or a data row"):
    raw.parse("movielens", d)


def _beauty_subset(data_root, directory, users=40):
  """The first ``users`` lines of Beauty's user_sequence.txt and their items' metadata."""
  src = os.path.join(data_root, raw.DEFAULT_SUBDIRS["beauty"])
  with open(os.path.join(src, "user_sequence.txt"), encoding="utf-8") as f:
    lines = f.read().splitlines()[:users]
  asins = {a for line in lines for a in line.split()[1:]}
  with open(os.path.join(src, "item_meta.json"), encoding="utf-8") as f:
    meta = {k: v for k, v in json.load(f).items() if k in asins}
  os.makedirs(directory)
  with open(os.path.join(directory, "user_sequence.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(directory, "item_meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f)
  return directory, len(asins), sum(len(line.split()) - 1 for line in lines)


def test_amazon_category_under_a_new_name(tmp_path, data_root):
  manual, num_items, num_interactions = _beauty_subset(data_root, str(tmp_path / "files"))
  cfg = demo.get_config()
  cfg.stages = "data"
  cfg.dataset.name = "my_category"
  cfg.dataset.format = "amazon_p5"
  cfg.dataset.manual_dir = manual
  workdir = str(tmp_path / "work")
  pipeline.run(cfg, workdir)
  stats = utils.read_json(wd.path(workdir, wd.DATA_STATS))
  assert stats["dataset"] == "my_category"
  assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (
      40, num_items, num_interactions)
  assert os.path.isdir(os.path.join(workdir, "tfds", "sigma_my_category"))
  files = [f for _, _, fs in os.walk(os.path.join(workdir, "tfds")) for f in fs]
  assert any(".array_record-" in f for f in files)
  assert builders.load("my_category", os.path.join(workdir, "tfds"), "amazon_p5").name == (
      "my_category")


def test_unisrec_category_under_a_new_name(tmp_path, data_root):
  """A UniSRec category's files are found by their <Category> prefix."""
  src = os.path.join(data_root, raw.DEFAULT_SUBDIRS["scientific"])
  d = tmp_path / "tools"
  d.mkdir()
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), d / f.replace("Scientific", "Tools"))
  data = raw.parse("my_tools", str(d), "unisrec")
  assert data.stats()["dataset"] == "my_tools"
  assert (len(data.users), len(data.items), data.num_interactions) == (8442, 4385, 59384)


def test_unisrec_category_run_into_by_a_description_is_no_category(data_root):
  """Scientific's item B00MIK00CI has its product description inside the category field (128
  words); it is read as no category, the other paths have at most 22 words."""
  data = raw.parse("scientific", os.path.join(data_root, raw.DEFAULT_SUBDIRS["scientific"]),
                   "unisrec")
  by_id = {it.raw_id: it for it in data.items}
  assert by_id["B00MIK00CI"].category_path == []
  assert by_id["B00MIK00CI"].text.count(" ") > 128  # the text itself is kept whole
  paths = [it.category_path for it in data.items if it.category_path]
  assert len(paths) == 4251  # of 4,385 items; the rest have no category field in the text
  assert max(len(p[0].split()) for p in paths) == 22
