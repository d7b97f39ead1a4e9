"""configs/base.py writes its defaults itself (configs import no library code); where the library
has defaults of its own for callers without a config, the two agree."""
from configs import base
from sigma_jax.data import tasks


def test_task_thresholds_equal_the_library_defaults():
  assert base.base_config().tasks.to_dict() == tasks.TASK_DEFAULTS


def test_every_task_threshold_resolves_from_the_config():
  # resolve_config reads each key from the config section; none falls back to a default.
  c = base.base_config().tasks
  for k in tasks.TASK_DEFAULTS:
    c[k] = type(c[k])(c[k] * 2) if k != "longtail_head_share" else 0.4
  resolved = tasks.resolve_config(c)
  assert resolved == c.to_dict() and resolved != tasks.TASK_DEFAULTS
