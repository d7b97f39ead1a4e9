"""`python -m launch.recommend` on the trained demo work directory, as a user runs it."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

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
  env.pop("XLA_FLAGS", None)
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
