r"""Rebuilds the offline demo sample shipped in sigma_jax/data/demo/ from MovieLens latest-small.

  python -m launch.make_demo_sample --source=$SIGMA_DATA_DIR/ml-latest-small

The sample: the first 300 users (by userId) with at most 60 ratings, all their ratings, the
movies they rated and the tags on those movies. GroupLens' README (its licence allows
redistribution of the data with it) is copied beside the sample.
"""
import os
import shutil

from absl import app, flags

_SOURCE = flags.DEFINE_string("source", None, "Directory of the original ml-latest-small files.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "..", "sigma_jax",
                                               "data", "demo"), "Output directory.")
_USERS = flags.DEFINE_integer("users", 300, "Number of users in the sample.")
_MAX_RATINGS = flags.DEFINE_integer("max_ratings", 60, "Only users with at most this many.")


def main(_):
  src = _SOURCE.value or os.path.join(os.environ.get("SIGMA_DATA_DIR", ""), "ml-latest-small")
  with open(os.path.join(src, "ratings.csv"), encoding="utf-8") as f:
    ratings = f.read().splitlines()
  counts = {}
  for line in ratings:
    uid = int(line.split(",", 1)[0])
    counts[uid] = counts.get(uid, 0) + 1
  users = sorted(u for u, n in counts.items() if n <= _MAX_RATINGS.value)[:_USERS.value]
  keep = set(users)
  kept = [line for line in ratings if int(line.split(",", 1)[0]) in keep]
  movies = {line.split(",", 2)[1] for line in kept}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "ratings.csv"), "w", encoding="utf-8") as f:
    f.write("\n".join(kept) + "\n")
  with open(os.path.join(src, "movies.csv"), encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.split(",", 1)[0] in movies]
  with open(os.path.join(_OUT.value, "movies.csv"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(src, "tags.csv"), encoding="utf-8") as f:
    tags = f.read().splitlines()
  with open(os.path.join(_OUT.value, "tags.csv"), "w", encoding="utf-8") as f:
    f.write("\n".join([tags[0]] + [t for t in tags[1:] if t.split(",")[1] in movies]) + "\n")
  shutil.copyfile(os.path.join(src, "README.txt"), os.path.join(_OUT.value, "README.txt"))
  print(f"{len(users)} users, {len(kept)} ratings, {len(movies)} movies -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
