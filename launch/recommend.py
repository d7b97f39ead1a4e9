r"""Top-N recommendations from a trained work directory.

  python -m launch.recommend --workdir=/tmp/sigma_demo --user=42 --task=justforyou
  python -m launch.recommend --workdir=/tmp/sigma_demo --user=42 --task=category \
      --category=Comedy --top=5 --json
  python -m launch.recommend --workdir=/tmp/sigma_demo --history=1,50,260 --task=holiday \
      --holiday=Christmas
  python -m launch.recommend --workdir=/tmp/sigma_demo --users_file=users.jsonl \
      --out=recs.jsonl --top=10

--user is a raw user id of the data (their history is their most recent items); --history a
comma-separated list of raw item ids, oldest first, for a new user. Tasks and their constraint
flags: justforyou, longtail, discover (none); category (--category, constrains decoding);
query (--query, constrains decoding to matching items); season (--season); holiday (--holiday).
--soft leaves the category or query to the instruction alone: nothing restricts decoding, so
the list shows how well the model follows it (`generation.constraints=soft`).

--users_file serves a file of requests, one JSON object per line, with the fields
{"id", "user" | "history", "task", "category" | "query" | "season" | "holiday", "template"}
("task" and "template" default to --task and --template), in batches of --batch_size (default
the config's generation.eval_batch) with a progress bar. --out gets one JSON line per request
line, in order: {"line", "id", "instruction", "items"} as --json prints, or {"line", "id",
"error"} for a line that cannot be served (also printed on stderr); it is written to a
temporary file and renamed when done. The exit status is 0 when at least one line was served,
1 when every line failed (or the file holds no request), 2 for bad arguments.
sigma_jax/serve.py's docstring has the format.

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
_USERS_FILE = flags.DEFINE_string("users_file", None, "JSON lines of requests to serve in "
                                  "batches (module docstring); needs --out.")
_OUT = flags.DEFINE_string("out", None, "--users_file: where the JSON-lines answer goes.")
_SOFT = flags.DEFINE_bool("soft", False, "Category and query constraints are soft: the "
                          "instruction asks for them and nothing else restricts decoding "
                          "(--config.generation.constraints=soft).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "--users_file: users per generator call; "
                                   "0: the config's generation.eval_batch.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint and dataset INFO logs would bury the answer; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  from sigma_jax import serve  # after flags, so JAX starts with the user's environment
  if _SOFT.value:
    _CONFIG.value.generation.constraints = "soft"
  if _USERS_FILE.value is not None:
    sys.exit(_serve_file(serve))
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


def _serve_file(serve) -> int:
  """--users_file: serves the file into --out; returns the exit status (module docstring)."""
  single = [f"--{f.name}" for f in (_USER, _HISTORY, _CATEGORY, _QUERY, _SEASON, _HOLIDAY, _JSON)
            if f.present]
  problem = None
  if single:
    problem = (f"{', '.join(single)} cannot be combined with --users_file (give them per line "
               "of the file)")
  elif not _OUT.value:
    problem = "--users_file needs --out=FILE for the answers"
  elif _BATCH_SIZE.value < 0:
    problem = f"--batch_size must be positive, got {_BATCH_SIZE.value}"
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  report = lambda line, message: print(f"{_USERS_FILE.value}:{line}: {message}", file=sys.stderr)
  try:
    task = serve.normalize_task(_TASK.value)
    rec = serve.load(_CONFIG.value, _WORKDIR.value)
    served, failed = serve.serve_file(rec, _USERS_FILE.value, _OUT.value, top=_TOP.value,
                                      batch_size=_BATCH_SIZE.value or None, task=task,
                                      template=_TEMPLATE.value, on_error=report)
  except serve.ServeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"served {served} of {served + failed} requests into {_OUT.value}"
        + (f"; {failed} failed (their lines hold an error)" if failed else ""), file=sys.stderr)
  if not served:
    print("error: no request could be served", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
