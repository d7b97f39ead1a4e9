r"""Amazon 2018 Industrial & Scientific (UniSRec preprocessing).

  python -m launch.train --config=configs/scientific.py --workdir=runs/scientific

Data: $SIGMA_DATA_DIR/amazon2018/Scientific (or --config.dataset.manual_dir=...).
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "scientific"
  if arg == "tiny":
    base.make_tiny(c)
  return c
