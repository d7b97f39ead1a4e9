r"""MovieLens latest-small: the dataset with timestamps, where all seven tasks exist.

  python -m launch.train --config=configs/movielens.py --workdir=runs/movielens

Data: $SIGMA_DATA_DIR/ml-latest-small (or --config.dataset.manual_dir=...).
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "movielens"
  if arg == "tiny":
    base.make_tiny(c)
  return c
