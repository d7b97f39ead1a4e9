r"""MovieLens latest-small: the dataset with timestamps, where all seven tasks exist.

  python -m launch.train --config=configs/movielens.py --workdir=runs/movielens

Data: $SIGMA_DATA_DIR/ml-latest-small (or --config.dataset.manual_dir=...).
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "movielens"
  # Sized for 2 CPU cores: about 35k SFT examples over the seven tasks (one epoch, ~550 steps)
  # instead of ~117k with the base cap of 50 per user and task; grounding 1000 steps, not 2000.
  c.tasks.max_train_per_user = 10
  c.ground.steps = 1000
  if arg == "tiny":
    base.make_tiny(c)
  return c
