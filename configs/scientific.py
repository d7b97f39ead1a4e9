r"""Amazon 2018 Industrial & Scientific (UniSRec preprocessing).

  python -m launch.train --config=configs/scientific.py --workdir=runs/scientific
  python -m launch.compare --config=configs/scientific.py --workdir=runs/scientific --tau_limit=4000

Data: $SIGMA_DATA_DIR/amazon2018/Scientific (or --config.dataset.manual_dir=...).
Protocol: TIGER's leave-one-out, history <= 20, full ranking over all 4,385 items, the
JustForYou (next-item) task. SFT trains on JustForYou only here: the published baselines are
single-task, and the comparison rows share one training recipe. docs/RESULTS.md has the numbers
this config gives and the machine they came from.
"""
from configs import base


def get_config(arg=None):
  c = base.base_config()
  c.dataset.name = "scientific"
  c.sft.tasks = "justforyou"
  c.generation.eval_tasks = "justforyou"
  # Beauty's recipe, chosen on Beauty's validation split (configs/beauty.py), not re-tuned here.
  c.sft.id_negatives = "catalogue"
  c.sft.epochs = 5.0
  c.ground.steps = 1000  # sized for 2 CPU cores, as for MovieLens (the base config has 2000)
  if arg == "tiny":
    base.make_tiny(c)
  return c
