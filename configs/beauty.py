r"""Amazon 2014 Beauty (TIGER/P5 5-core split), the headline benchmark.

  python -m launch.train --config=configs/beauty.py --workdir=runs/beauty

Data: $SIGMA_DATA_DIR/amazon2014/Beauty (or --config.dataset.manual_dir=...).
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "beauty"
  if arg == "tiny":
    base.make_tiny(c)
  return c
