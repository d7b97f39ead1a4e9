"""`python -m launch.recommend` on the trained demo work directory, as a user runs it."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SUBPROCESS_XLA_FLAGS

pytestmark = pytest.mark.slow

_RATINGS = os.path.join(ROOT, "sigma_jax", "data", "demo", "ratings.csv")


def _demo_user():
  """(raw user id, three of their raw item ids) from the bundled demo ratings."""
  with open(_RATINGS) as f:
    rows = list(csv.reader(f))
  user = rows[0][0]
  return user, [r[1] for r in rows if r[0] == user][:3]


USER, ITEMS = _demo_user()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  """The CLI's environment: one CPU device, and a JAX compilation cache shared by the calls
  (each restores the model and compiles the decoder; later calls reuse the programs)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
  return env


def recommend(env, *args, timeout=300):
  """`python -m launch.recommend ARGS` in a subprocess."""
  return subprocess.run([sys.executable, "-m", "launch.recommend", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _ok(out):
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_known_user_table(demo_workdir, cli_env):
  stdout = _ok(recommend(cli_env, f"--workdir={demo_workdir}", f"--user={USER}",
                         "--task=justforyou", "--top=7"))
  lines = stdout.strip().splitlines()
  assert lines[0].startswith("instruction: ")
  header, rule, body = lines[1], lines[2], lines[3:]
  assert header.split()[:4] == ["#", "item", "score", "title"] and set(rule) <= {"-", " "}
  assert [b.split()[0] for b in body] == [str(i) for i in range(1, 8)]
  # Every row has an item id, a score and a title.
  assert all(len(b.split()) >= 4 for b in body)


def test_known_user_json_category(demo_workdir, cli_env):
  stdout = _ok(recommend(cli_env, f"--workdir={demo_workdir}", f"--user={USER}",
                         "--task=Category", "--category=comedy", "--top=5", "--json"))
  out = json.loads(stdout)
  assert "Comedy" in out["instruction"]
  items = out["items"]
  assert len(items) == 5
  assert len({r["item"] for r in items}) == 5
  for r in items:
    assert set(r) == {"item", "title", "category", "score"}
    assert r["title"].strip()
    assert "Comedy" in r["category"].split(", "), r
  scores = [r["score"] for r in items]
  assert scores == sorted(scores, reverse=True)


def test_new_user_history(demo_workdir, cli_env):
  stdout = _ok(recommend(cli_env, f"--workdir={demo_workdir}",
                         f"--history={','.join(ITEMS)}", "--task=holiday", "--holiday=christmas",
                         "--json"))
  out = json.loads(stdout)
  assert "Christmas" in out["instruction"]
  assert len(out["items"]) == 10  # the default --top
  assert all(r["title"].strip() for r in out["items"])


@pytest.mark.parametrize("args,message", [
    (["--user=no_such_user"], "unknown user 'no_such_user'"),
    (["--history=1,no_such_item"], "unknown item id(s) in the history: no_such_item"),
    (["--task=bogus"], "unknown task 'bogus'"),
    (["--task=category", "--category=Nonsense"], "unknown category 'Nonsense'; valid ones"),
    (["--task=category"], "needs a constraint: give --category"),
    (["--task=query"], "needs a constraint: give --query"),
    (["--task=season"], "needs a constraint: give --season"),
    (["--task=holiday"], "needs a constraint: give --holiday"),
    (["--history="], "the history is empty"),
    (["--task=query", "--query=zzzqqq xxxyyy"], "matches no item"),
])
def test_errors(demo_workdir, cli_env, args, message):
  if not any(a.startswith(("--user", "--history")) for a in args):
    args = [f"--user={USER}"] + args
  out = recommend(cli_env, f"--workdir={demo_workdir}", *args)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert out.stdout == ""


def test_error_no_model(tmp_path, cli_env):
  out = recommend(cli_env, f"--workdir={tmp_path}", f"--user={USER}")
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert "has no trained model" in out.stderr.strip().splitlines()[-1]


# -- batch serving (--users_file) -------------------------------------------------------------


@pytest.fixture(scope="module")
def rec(demo_workdir):
  """The demo work directory's Recommender, in this process."""
  from configs import demo
  from sigma_jax import serve
  return serve.load(demo.get_config(), demo_workdir)


def _requests_file(tmp_path, lines):
  path = tmp_path / "users.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_serve_file_answers_every_line_in_order(rec, tmp_path):
  from sigma_jax import serve
  lines = [
      json.dumps({"id": "u1", "user": USER}),                                     # 1
      json.dumps({"history": ITEMS, "task": "holiday", "holiday": "christmas"}),  # 2
      '{"user": ',                                                                # 3 bad JSON
      json.dumps({"id": 7, "history": [ITEMS[0], "no_such_item"]}),               # 4
      "",                                                                         # blank
      json.dumps({"history": []}),                                                # 6
      json.dumps({"user": "no_such_user"}),                                       # 7
      json.dumps({"user": USER, "topp": 3}),                                      # 8
      json.dumps({"user": USER, "task": "category", "category": "Comedy"}),       # 9
      json.dumps(["not", "an", "object"]),                                        # 10
      json.dumps({"history": ",".join(ITEMS)}),                                   # 11
  ]
  out = str(tmp_path / "recs.jsonl")
  errors = []
  served, failed = serve.serve_file(rec, _requests_file(tmp_path, lines), out, top=5,
                                    batch_size=2, progress=False,
                                    on_error=lambda n, m: errors.append(n))
  assert (served, failed) == (4, 6)
  records = [json.loads(l) for l in open(out)]
  assert [r["line"] for r in records] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
  by_line = {r["line"]: r for r in records}
  assert sorted(errors) == [3, 4, 6, 7, 8, 10]
  reasons = {3: "not valid JSON", 4: "unknown item id(s) in the history: no_such_item",
             6: "the history is empty", 7: "unknown user 'no_such_user'",
             8: "unknown field(s) 'topp'", 10: "a request is a JSON object"}
  for line, reason in reasons.items():
    assert reason in by_line[line]["error"], by_line[line]
    assert "items" not in by_line[line]
  assert by_line[1]["id"] == "u1" and by_line[4]["id"] == 7
  for line in (1, 2, 9, 11):
    r = by_line[line]
    assert "error" not in r and r["instruction"]
    assert len(r["items"]) == 5
    assert all(set(i) == {"item", "title", "category", "score"} for i in r["items"])
  assert "Christmas" in by_line[2]["instruction"]
  assert all("Comedy" in i["category"].split(", ") for i in by_line[9]["items"])
  # A batch answers as the single-user call does (same lists, same instruction).
  # (Scores to float32 rounding: a batch of 2 and a batch of 1 are different programs.)
  def same(batch_rows, single_rows):
    assert [i["item"] for i in batch_rows] == [i["item"] for i in single_rows]
    assert [i["score"] for i in batch_rows] == pytest.approx([i["score"] for i in single_rows],
                                                             rel=1e-4, abs=1e-6)

  single, instruction = rec.recommend(user=USER, top=5, with_instruction=True)
  same(by_line[1]["items"], single)
  assert by_line[1]["instruction"] == instruction
  # A list history and a comma-separated one are the same request.
  same(by_line[11]["items"], rec.recommend(history=ITEMS, top=5))
  # Written through a temporary file: nothing else is left next to the answer.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["recs.jsonl", "users.jsonl"]


def test_serve_file_every_line_failed(rec, tmp_path):
  from sigma_jax import serve
  path = _requests_file(tmp_path, ['{"user": "no_such_user"}', "oops"])
  out = str(tmp_path / "recs.jsonl")
  assert serve.serve_file(rec, path, out, progress=False) == (0, 2)
  assert [set(json.loads(l)) for l in open(out)] == [{"line", "error"}] * 2
  with pytest.raises(serve.ServeError, match="cannot read"):
    serve.serve_file(rec, str(tmp_path / "missing.jsonl"), out, progress=False)


def test_users_file_cli(demo_workdir, cli_env, tmp_path):
  path = _requests_file(tmp_path, [json.dumps({"user": USER}), json.dumps({"user": "nobody"})])
  out = tmp_path / "out" / "recs.jsonl"
  proc = recommend(cli_env, f"--workdir={demo_workdir}", f"--users_file={path}", f"--out={out}",
                   "--top=3", "--batch_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{path}:2: unknown user 'nobody'" in proc.stderr
  assert "served 1 of 2 requests" in proc.stderr
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(records[0]["items"]) == 3 and "error" in records[1]


def test_soft_category_is_asked_for_not_enforced(rec):
  """--soft (generation.constraints=soft): the category is in the instruction but no longer
  restricts decoding; the hard request's items all belong to it."""
  hard = rec.prepare(user=USER, task="category", category="comedy")
  rec.cfg.generation.constraints = "soft"
  try:
    soft = rec.prepare(user=USER, task="category", category="comedy")
    rows = rec.serve([soft], top=10)[0]
  finally:
    rec.cfg.generation.constraints = "hard"
  assert hard.allowed is not None and hard.allowed.any() and not hard.allowed.all()
  assert soft.allowed is None and soft.instruction == hard.instruction
  assert "Comedy" in soft.instruction and len(rows) == 10
  hard_rows = rec.serve([hard], top=10)[0]
  assert all("Comedy" in r["category"].split(", ") for r in hard_rows)
