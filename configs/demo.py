r"""Offline demo: a small real sample of MovieLens latest-small shipped inside the package.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/sigma_demo

Needs no data directory; sized to run end to end on a 2-core CPU in minutes.
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "demo"
  base.make_tiny(c)
  return base.apply_variant(c, arg)
