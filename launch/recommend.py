r"""Top-N recommendations from a trained work directory.

  python -m launch.recommend --workdir=/tmp/sigma_demo --user=42 --task=justforyou
  python -m launch.recommend --workdir=/tmp/sigma_demo --user=42 --task=category \
      --category=Comedy --top=5 --json
  python -m launch.recommend --workdir=/tmp/sigma_demo --history=1,50,260 --task=holiday \
      --holiday=Christmas

--user is a raw user id of the data (their history is their most recent items); --history a
comma-separated list of raw item ids, oldest first, for a new user. Tasks and their constraint
flags: justforyou, longtail, discover (none); category (--category, constrains decoding);
query (--query, constrains decoding to matching items); season (--season); holiday (--holiday).

--config must be the config the work directory was trained with (default configs/demo.py), with
the same model overrides, e.g. --config=configs/beauty.py:tiny. Bad arguments print one line
on stderr and exit with status 2.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEMO, "The experiment config the work directory was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained work directory.")
_USER = flags.DEFINE_string("user", None, "Raw id of a known user.")
_HISTORY = flags.DEFINE_string("history", None, "Comma-separated raw item ids (a new user).")
_TASK = flags.DEFINE_string("task", "justforyou", "Task: justforyou, query, category, longtail, "
                            "discover, season, holiday.")
_CATEGORY = flags.DEFINE_string("category", None, "Category (task category).")
_QUERY = flags.DEFINE_string("query", None, "Search query (task query).")
_SEASON = flags.DEFINE_string("season", None, "Season: winter, spring, summer, autumn.")
_HOLIDAY = flags.DEFINE_string("holiday", None, "Holiday, e.g. Christmas (task holiday).")
_TOP = flags.DEFINE_integer("top", 10, "How many items to return.")
_TEMPLATE = flags.DEFINE_integer("template", 0, "Which phrasing of the task's instruction.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint and dataset INFO logs would bury the answer; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  from sigma_jax import serve  # after flags, so JAX starts with the user's environment
  try:
    rows, instruction = serve.recommend(
        _WORKDIR.value, _CONFIG.value, user=_USER.value, history=_HISTORY.value,
        task=_TASK.value, category=_CATEGORY.value, query=_QUERY.value, season=_SEASON.value,
        holiday=_HOLIDAY.value, top=_TOP.value, template=_TEMPLATE.value,
        with_instruction=True)
  except serve.ServeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    json.dump({"instruction": instruction, "items": rows}, sys.stdout, indent=2)
    print()
  else:
    print(serve.format_table(rows, instruction, _TOP.value))


if __name__ == "__main__":
  app.run(main)
