"""Top-N recommendations from a trained work directory, for one user or a file of users.

The library side of ``python -m launch.recommend`` and of the notebook:

  rec = serve.load(cfg, workdir)            # dataset now, model on first use (cached)
  rows = rec.recommend(user="42", task="category", category="Comedy", top=10)
  rows = serve.recommend(workdir, cfg, history=["1", "50"], task="justforyou")
  served, failed = serve.serve_file(rec, "users.jsonl", "recs.jsonl", top=10)

A known user is named by the raw user id of the data; their history is their most recent items
(the test history of the leave-one-out split, newest last). A new user is an explicit list of
raw item ids. The instruction is one of the task's phrasings (`tasks.TEMPLATES`) filled with the
constraint; Category and Query also constrain decoding to the items that satisfy them (DESIGN
§1.4 step 1), Season and Holiday only go into the instruction, as in training.

Every problem a user can cause (unknown user, item, task or category, a missing constraint,
an empty history, no trained model, a query matching nothing) raises `ServeError` with a
one-line message, checked before the model is loaded where possible.

Batch serving (`serve_file`) reads one request per line, a JSON object with the single-user
arguments as fields (`REQUEST_FIELDS`):

  {"id": "a", "user": "42"}
  {"history": ["1", "50", "260"], "task": "holiday", "holiday": "Christmas"}
  {"user": "7", "task": "category", "category": "Comedy", "template": 2}

exactly one of "user" (a raw user id) or "history" (raw item ids, oldest first: a list, or one
comma-separated string); "task" (default the caller's, `justforyou`) and its constraint field;
"template"; "id", any JSON value, is copied to the answer. Blank lines are skipped. Each
request line gets one output line, in input order: {"line": its 1-based line number, "id" when
given, "instruction", "items"} (the fields of the single-user `--json` output), or {"line",
"id", "error": the one-line reason} for a line that cannot be served (malformed JSON, an
unknown field, user, item, task or category, an empty history, ...); the other lines are
served all the same. Requests are served in batches of a fixed size (one compiled program):
unconstrained ones together, constrained ones (category, query) together.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re

import numpy as np

from sigma_jax import utils, workdir as wd
from sigma_jax.data import pairs, tasks as tasks_lib

# Which keyword argument of `recommend` carries each task's constraint.
CONSTRAINT_ARG = {"category": "category", "query": "query", "season": "season",
                  "holiday": "holiday"}
_SEASON_ALIASES = {"fall": "autumn"}
# The fields of one request line of a users file (`serve_file`).
REQUEST_FIELDS = ("id", "user", "history", "task", "category", "query", "season", "holiday",
                  "template")


class ServeError(ValueError):
  """A request that cannot be served; the message is one line, meant for the user."""


def _norm(name: str) -> str:
  """Lower case, letters and digits only: 'Valentine's Day' == 'valentines_day'."""
  return re.sub(r"[^a-z0-9]", "", str(name).lower())


def normalize_task(task: str) -> str:
  """'JustForYou' / 'just_for_you' -> 'justforyou'.

  Raises:
    ServeError: not one of `tasks.TASKS`.
  """
  key = _norm(task)
  if key not in tasks_lib.TASKS:
    raise ServeError(f"unknown task {task!r}; choose from {', '.join(tasks_lib.TASKS)}")
  return key


def check_constraint_args(task: str, **constraints) -> str | None:
  """The constraint value of ``task`` from keyword arguments, checking that none is misplaced.

  Args:
    task: a normalised task name.
    **constraints: category=, query=, season=, holiday= (None when not given).

  Returns:
    The constraint string, or None for a task without one.

  Raises:
    ServeError: the task's constraint is missing or empty, or another task's is given.
  """
  need = CONSTRAINT_ARG.get(task)
  for arg, value in constraints.items():
    if value is not None and arg != need:
      raise ServeError(f"--{arg} does not apply to task {task!r}"
                       + (f" (it takes --{need})" if need else " (it takes no constraint)"))
  if need is None:
    return None
  value = constraints.get(need)
  if value is None or not str(value).strip():
    raise ServeError(f"task {task!r} needs a constraint: give --{need}=...")
  return str(value).strip()


def has_model(workdir: str) -> bool:
  """Whether ``workdir`` holds an SFT checkpoint (a step directory under sft/ckpt)."""
  ckpt = wd.ckpt_dir(workdir, "sft")
  return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))


def category_label(item, genres: bool) -> str:
  """An item's categories as one string: 'Action, Comedy' (genres) or 'Beauty > Skin Care'."""
  return (", " if genres else " > ").join(item.category_path)


class Recommender:
  """A trained work directory ready to serve: dataset tables now, the generator lazily.

  Attributes:
    cfg: the experiment config the work directory was trained with.
    workdir: the work directory.
    dataset: the `loader.Dataset`.
    available: task names this dataset supports.
    category_names: [C] category names (`tasks.item_categories`).
    membership: [N, C] bool.
    step: the SFT checkpoint step served (None until `generator` first loads the model).
  """

  def __init__(self, cfg, workdir: str):
    if not os.path.isdir(workdir):
      raise ServeError(f"work directory {workdir} does not exist")
    if not has_model(workdir):
      raise ServeError(f"{workdir} has no trained model (no checkpoint in {workdir}/sft/ckpt): "
                       "run python -m launch.train on it first")
    from sigma_jax.data import loader  # loads TFDS; not needed to validate arguments
    self.cfg, self.workdir = cfg, workdir
    try:
      self.dataset = loader.load_dataset(cfg, workdir)
    except Exception as e:  # a work directory of another dataset or config
      raise ServeError(f"cannot load the dataset of {workdir} with config dataset "
                       f"{cfg.dataset.name!r}: {type(e).__name__}: {e}".splitlines()[0]) from e
    data = self.dataset.raw
    self.available, self.unavailable = tasks_lib.available_tasks(self.dataset)
    self.category_names, self.membership = tasks_lib.item_categories(self.dataset)
    # Several categories per item are genres (MovieLens); one is a path (Amazon).
    self._genres = bool(self.membership.sum(axis=1).max(initial=0) > 1)
    self.item_index = {str(it.raw_id): i for i, it in enumerate(data.items)}
    row_of = {int(u): r for r, u in enumerate(self.dataset.splits.users)}
    self.user_row = {str(u.raw_id): row_of[i] for i, u in enumerate(data.users) if i in row_of}
    self._generators = {}
    self.step = None  # the SFT step of the loaded model, once a generator is built

  @property
  def max_history(self) -> int:
    return int(self.dataset.splits.test_hist.shape[1])

  def generator(self, top_n: int):
    """The `Generator` returning at least ``top_n`` items (built once per list length)."""
    n = max(int(top_n), int(self.cfg.generation.top_n))
    if n not in self._generators:
      from sigma_jax.eval import evaluate  # JAX and the model: only once a list is asked for
      cfg = self.cfg
      if n != int(cfg.generation.top_n):
        cfg = cfg.copy_and_resolve_references()
        cfg.generation.top_n = n
      try:
        _, gen, self.step = evaluate.load_generator(cfg, self.workdir)
      except FileNotFoundError as e:
        raise ServeError(str(e).splitlines()[0]) from e
      self._generators[n] = gen
    return self._generators[n]

  # -- arguments -> model inputs ---------------------------------------------------------------

  def history_of(self, user=None, history=None) -> np.ndarray:
    """[H'] item indices, newest last: a known user's recent items or an explicit history.

    Raises:
      ServeError: neither or both given, an unknown user or item, an empty history.
    """
    if (user is None) == (history is None):
      raise ServeError("give exactly one of --user (a known user) or --history (item ids)")
    if user is not None:
      row = self.user_row.get(str(user).strip())
      if row is None:
        some = ", ".join(list(self.user_row)[:5])
        raise ServeError(f"unknown user {user!r}; user ids look like {some}")
      hist = self.dataset.splits.test_hist[row]
      return np.asarray(hist[hist >= 0], np.int32)
    ids = [h.strip() for h in history.split(",")] if isinstance(history, str) else \
        [str(h).strip() for h in history]
    ids = [h for h in ids if h]
    if not ids:
      raise ServeError("the history is empty: give at least one item id")
    unknown = [h for h in ids if h not in self.item_index]
    if unknown:
      raise ServeError(f"unknown item id(s) in the history: {', '.join(unknown[:5])}")
    # The model was trained on at most max_history items, the newest last.
    return np.array([self.item_index[h] for h in ids][-self.max_history:], np.int32)

  def instruction(self, task: str, category=None, query=None, season=None, holiday=None,
                  template: int = 0) -> tuple[str, str, np.ndarray | None]:
    """The task's instruction and its decoding constraint.

    Args:
      task: a task name (any case).
      category, query, season, holiday: the task's constraint (exactly the one it takes).
      template: which of `tasks.TEMPLATES[task]` phrases it (modulo their number).

    Returns:
      (task, instruction text, [N] bool allowed items or None).

    Raises:
      ServeError: see `normalize_task`, `check_constraint_args`; an unavailable task, an
        unknown category, season or holiday, a query that matches no item.
    """
    task = normalize_task(task)
    value = check_constraint_args(task, category=category, query=query, season=season,
                                  holiday=holiday)
    if task not in self.available:
      raise ServeError(f"task {task!r} is not available here: {self.unavailable[task]}")
    allowed, fill = None, value
    if task == "category":
      by_norm = {c.lower(): j for j, c in enumerate(self.category_names)}
      j = by_norm.get(value.lower())
      if j is None:
        close = difflib.get_close_matches(value, self.category_names, n=3)
        some = close or self.category_names[:6]
        raise ServeError(f"unknown category {value!r}; valid ones include {', '.join(some)} "
                         f"({len(self.category_names)} in all)")
      fill = self.category_names[j]
      allowed = self.membership[:, j].copy()
    elif task == "query":
      # Only words of 4+ letters outside the stop list are searchable (pairs.title_terms);
      # keeping the user's word order gives the phrasing training used.
      terms = pairs.title_terms(value)
      words = list(dict.fromkeys(w for w in re.findall(r"[a-z][a-z\-']{3,}", value.lower())
                                 if w in terms))
      allowed = (tasks_lib.query_matches(" ".join(words), self.dataset) if words else None)
      if allowed is None or not allowed.any():
        raise ServeError(f"the query {value!r} matches no item"
                         + ("" if words else " (searchable words have 4+ letters)"))
      fill = " ".join(words)
    elif task == "season":
      names = {_norm(s): s for s in tasks_lib.SEASON_NAMES}
      fill = names.get(_norm(_SEASON_ALIASES.get(value.lower(), value)))
      if fill is None:
        raise ServeError(f"unknown season {value!r}; choose from "
                         f"{', '.join(tasks_lib.SEASON_NAMES)}")
    elif task == "holiday":
      names = {_norm(h): h for h in tasks_lib.HOLIDAY_NAMES}
      names.update({_norm(k): h for k, h in zip(pairs.HOLIDAYS, tasks_lib.HOLIDAY_NAMES)})
      fill = names.get(_norm(value))
      if fill is None:
        raise ServeError(f"unknown holiday {value!r}; choose from "
                         f"{', '.join(tasks_lib.HOLIDAY_NAMES)}")
    templates = tasks_lib.TEMPLATES[task]
    text = templates[int(template) % len(templates)]
    if fill is not None:
      text = text.format(**{task: fill})  # each placeholder is named after its task
    return task, text, allowed

  # -- serving --------------------------------------------------------------------------------

  def prepare(self, user=None, history=None, task: str = "justforyou", category=None,
              query=None, season=None, holiday=None, template: int = 0) -> "Request":
    """A checked request, ready to `serve` (arguments as in `recommend`).

    Raises:
      ServeError: any bad argument (module docstring).
    """
    task, text, allowed = self.instruction(task, category, query, season, holiday, template)
    if self.cfg.generation.get("constraints", "hard") == "soft":
      allowed = None  # the instruction alone asks for the category or query; nothing enforces it
    return Request(self.history_of(user, history), text, allowed)

  def serve(self, requests: list, top: int = 10, tau: float | None = None,
            batch_size: int | None = None, progress=None) -> list:
    """The top-``top`` rows of each of ``requests`` (`prepare`d), in their order.

    Args:
      requests: `Request`s.
      top: N, the list length.
      tau: APF temperature (default: the config's generation.apf_tau).
      batch_size: users per generator call; each call is padded to it (one compiled program
        per kind of batch). None: all requests in one call, unpadded.
      progress: optional callable, given the number of requests each call served.

    Returns:
      [rows of `recommend`] per request.
    """
    if int(top) < 1:
      raise ServeError(f"--top must be at least 1, got {top}")
    gen = self.generator(int(top))
    out = [None] * len(requests)
    # Unconstrained requests share the full catalogue's tables; constrained ones get their own.
    groups = [[i for i, r in enumerate(requests) if r.allowed is None],
              [i for i, r in enumerate(requests) if r.allowed is not None]]
    for group in groups:
      size = int(batch_size) if batch_size else max(1, len(group))
      for s in range(0, len(group), size):
        rows = group[s:s + size]
        padded = rows + [rows[-1]] * (size - len(rows)) if batch_size else rows
        chosen = [requests[i] for i in padded]
        allowed = (None if chosen[0].allowed is None else
                   np.stack([r.allowed for r in chosen]))
        ranked = gen.recommend([r.history for r in chosen], [r.instruction for r in chosen],
                               allowed, tau=tau)
        for j, i in enumerate(rows):
          out[i] = self._rows(ranked, j, int(top))
        if progress is not None:
          progress(len(rows))
    return out

  def _rows(self, ranked, j: int, top: int) -> list:
    """Row ``j`` of a `fusion.Ranked` as `recommend`'s list of dicts."""
    items = np.asarray(ranked.items)[j]
    scores = np.asarray(ranked.scores)[j]
    ok = np.asarray(ranked.valid)[j] & (items >= 0)
    data = self.dataset.raw
    rows = []
    for i, s in zip(items[ok][:top], scores[ok][:top]):
      it = data.items[int(i)]
      rows.append({"item": str(it.raw_id), "title": it.title,
                   "category": category_label(it, self._genres), "score": float(s)})
    return rows

  def recommend(self, user=None, history=None, task: str = "justforyou", category=None,
                query=None, season=None, holiday=None, top: int = 10, template: int = 0,
                tau: float | None = None, with_instruction: bool = False):
    """The top-``top`` items for one user and one instruction.

    Args:
      user: a known user's raw id; or
      history: raw item ids (list or 'id,id,...'), oldest first, for a new user.
      task: a task name (`tasks.TASKS`, any case).
      category, query, season, holiday: the task's constraint.
      top: N, the list length (a narrow Query can return fewer).
      template: which phrasing of the task's instruction to use.
      tau: APF temperature (default: the config's generation.apf_tau).
      with_instruction: also return the instruction text.

    Returns:
      list of {"item": raw id, "title", "category", "score"} best first, or
      (that list, instruction) with ``with_instruction``.

    Raises:
      ServeError: any bad argument (module docstring).
    """
    if int(top) < 1:
      raise ServeError(f"--top must be at least 1, got {top}")
    request = self.prepare(user, history, task, category, query, season, holiday, template)
    rows = self.serve([request], int(top), tau)[0]
    return (rows, request.instruction) if with_instruction else rows


@dataclasses.dataclass
class Request:
  """One checked request (`Recommender.prepare`): [H'] item indices, newest last; the
  instruction text; [N] bool allowed items or None."""
  history: np.ndarray
  instruction: str
  allowed: np.ndarray | None


def parse_request(line: str, task: str = "justforyou", template: int = 0) -> dict:
  """One line of a users file (module docstring) -> keyword arguments of
  `Recommender.prepare`; ``task`` and ``template`` are the defaults of lines without them.

  Raises:
    ServeError: not a JSON object, an unknown field, a field of the wrong type.
  """
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ServeError(f"not valid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(obj, dict):
    raise ServeError('a request is a JSON object, e.g. {"user": "42"}')
  unknown = sorted(set(obj) - set(REQUEST_FIELDS))
  if unknown:
    raise ServeError(f"unknown field(s) {', '.join(map(repr, unknown))}; a request takes "
                     f"{', '.join(REQUEST_FIELDS)}")
  kwargs = {"task": task, "template": template}
  kwargs.update({k: v for k, v in obj.items() if k != "id"})
  for key in ("user", "task", "category", "query", "season", "holiday"):
    value = kwargs.get(key)
    if value is not None and (not isinstance(value, (str, int)) or isinstance(value, bool)):
      raise ServeError(f'"{key}" must be a string, got {json.dumps(value)}')
  hist = kwargs.get("history")
  if hist is not None and not isinstance(hist, str) and not (
      isinstance(hist, list) and all(isinstance(h, (str, int)) and not isinstance(h, bool)
                                     for h in hist)):
    raise ServeError('"history" must be a list of item ids or an "id,id,..." string')
  if not isinstance(kwargs["template"], int) or isinstance(kwargs["template"], bool):
    raise ServeError(f'"template" must be an integer, got {json.dumps(kwargs["template"])}')
  for key in ("user", "category", "query", "season", "holiday"):
    if kwargs.get(key) is not None:
      kwargs[key] = str(kwargs[key])
  return kwargs


def serve_file(rec: Recommender, users_file: str, out: str, top: int = 10,
               batch_size: int | None = None, task: str = "justforyou", template: int = 0,
               tau: float | None = None, progress: bool = True,
               on_error=None) -> tuple[int, int]:
  """Serves every request line of ``users_file`` into ``out`` (module docstring).

  ``out`` is written to a temporary file in its directory, then renamed: it never holds a
  partial answer.

  Args:
    rec: the `Recommender`.
    users_file: JSON lines, one request each.
    out: the JSON-lines answer, one line per request line.
    top: N, the list length.
    batch_size: users per generator call (default the config's generation.eval_batch).
    task, template: defaults of request lines without them.
    tau: APF temperature (default: the config's generation.apf_tau).
    progress: show a progress bar.
    on_error: optional callable(line number, message) for each line that fails.

  Returns:
    (served, failed) line counts.

  Raises:
    ServeError: ``users_file`` cannot be read, or ``top`` is not positive.
  """
  from tqdm import tqdm
  if int(top) < 1:
    raise ServeError(f"--top must be at least 1, got {top}")
  try:
    with open(users_file, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ServeError(f"cannot read {users_file}: {e}".splitlines()[0]) from e
  records, ready, requests = [], [], []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    record = {"line": number}
    try:
      obj = json.loads(line)
      if isinstance(obj, dict) and "id" in obj:
        record["id"] = obj["id"]
    except json.JSONDecodeError:
      pass
    try:
      requests.append(rec.prepare(**parse_request(line, task, template)))
      ready.append(len(records))
    except ServeError as e:
      record["error"] = str(e)
      if on_error is not None:
        on_error(number, str(e))
    records.append(record)
  size = int(batch_size or rec.cfg.generation.eval_batch)
  with tqdm(total=len(requests), desc="recommend", unit="user", disable=not progress) as bar:
    served = rec.serve(requests, int(top), tau, size, progress=bar.update) if requests else []
  for k, request, rows in zip(ready, requests, served):
    records[k].update(instruction=request.instruction, items=rows)

  def write(f):
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")

  utils.atomic_write(out, write, "w")
  return len(served), len(records) - len(served)


_CACHE: dict = {}


def load(cfg, workdir: str) -> Recommender:
  """The (cached) Recommender of a work directory and config."""
  key = (os.path.abspath(workdir), cfg.to_json_best_effort(sort_keys=True))
  if key not in _CACHE:
    if len(_CACHE) >= 2:
      _CACHE.clear()
    _CACHE[key] = Recommender(cfg, workdir)
  return _CACHE[key]


def recommend(workdir: str, cfg, user=None, history=None, task: str = "justforyou", **kwargs):
  """`Recommender.recommend` on the cached Recommender of ``workdir`` (see there)."""
  # Argument errors first: they need no dataset and no model.
  name = normalize_task(task)
  check_constraint_args(name, **{k: kwargs.get(k) for k in CONSTRAINT_ARG})
  return load(cfg, workdir).recommend(user=user, history=history, task=name, **kwargs)


def format_table(rows: list, instruction: str | None = None, top: int | None = None) -> str:
  """A plain-text table of `recommend` rows (rank, item, score, title, category).

  Args:
    rows: `recommend`'s result.
    instruction: printed above the table when given.
    top: the list length asked for; a shorter list is noted under the table.
  """
  head = ("#", "item", "score", "title", "category")
  body = [(str(r + 1), row["item"], f"{row['score']:.4f}", row["title"], row["category"])
          for r, row in enumerate(rows)]
  widths = [max(len(h), *(len(b[c]) for b in body)) if body else len(h)
            for c, h in enumerate(head)]
  widths[3] = min(widths[3], 60)
  fmt = lambda cells: "  ".join(
      (c[:widths[k] - 1] + "…" if len(c) > widths[k] else c).ljust(widths[k])
      for k, c in enumerate(cells)).rstrip()
  lines = ([f"instruction: {instruction}"] if instruction else []) + [
      fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(b) for b in body]
  if top is not None and len(body) < top:
    # A narrow constraint can leave fewer allowed items among the decoder's candidates.
    lines.append(f"({len(body)} of {top} items: the decoder found no more items that satisfy "
                 "the instruction)")
  return "\n".join(lines)
