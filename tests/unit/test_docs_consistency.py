"""The numbers README.md and the dataset configs' docstrings quote agree with the results JSON in
docs/results/ they come from (written by `launch.compare --out=docs/results`).

Each quoted number is read out of the text with a pattern naming its row, and compared with the
JSON value rounded to four places as the docs print it (".0840"). A number edited by hand, or a
JSON re-generated without updating the docs, fails here.
"""
import json
import os
import re

import pytest

from conftest import ROOT

KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def _json(name):
  """The rows of docs/results/<name>.json (name may be 'subdir/dataset')."""
  with open(os.path.join(ROOT, "docs", "results", f"{name}.json")) as f:
    return json.load(f)["rows"]


# Scientific's per-position sigma, sigma_no_apf and gr_id rows were run into their own results
# directory; its configs/scientific.py docstring says which JSON each row comes from.
SCIENTIFIC = {"collab": "scientific", "gr_sid": "scientific", "sigma_no_grounding": "scientific",
              "sigma": "scientific_pp/scientific", "sigma_no_apf": "scientific_pp/scientific",
              "gr_id": "scientific_pp/scientific"}


def _text(rel):
  with open(os.path.join(ROOT, rel)) as f:
    return f.read()


def _fmt(x: float) -> str:
  """0.08397 -> '.0840' (the docs' style)."""
  return f"{x:.4f}".lstrip("0")


def _cells(line: str) -> list:
  return re.findall(r"(?<![\d.])\.\d{4}(?!\d)", line)


def _line(text: str, pattern: str) -> str:
  found = [ln for ln in text.splitlines() if re.search(pattern, ln)]
  assert len(found) == 1, f"expected one line matching {pattern!r}, found {found}"
  return found[0]


def _mean_ndcg(row: dict, split: str) -> float:
  tasks = row[split]
  return sum(m["ndcg@10"] for m in tasks.values()) / len(tasks)


def test_number_format():
  assert _fmt(0.08397) == ".0840" and _cells("| a | .0590 | 1.0000 | .12345 |") == [".0590"]


README_BEAUTY = {r"^\| collab \(this repository": "collab", r"^\| sigma \(small backbone": "sigma",
                 r"^\| sigma without APF": "sigma_no_apf"}


@pytest.mark.parametrize("pattern, row", README_BEAUTY.items())
def test_readme_beauty_table(pattern, row):
  test = _json("beauty")[row]["test"]
  assert _cells(_line(_text("README.md"), pattern)) == [_fmt(test[k]) for k in KEYS]


def test_readme_scientific_sentence():
  text = " ".join(_text("README.md").split())
  for label, row in (("sigma", "sigma"), ("SASRec", "collab"), ("gr_id", "gr_id"),
                     ("sigma without APF", "sigma_no_apf"), ("gr_sid", "gr_sid")):
    n10 = _json(SCIENTIFIC[row])[row]["test"]["ndcg@10"]
    assert f"{label} {_fmt(n10)}" in text, (label, row)


@pytest.mark.parametrize("row", ["sigma", "gr_sid", "gr_id", "sigma_no_grounding",
                                 "sigma_no_apf"])
def test_readme_and_config_movielens_means(row):
  r = _json("movielens")[row]
  val, test = _fmt(_mean_ndcg(r, "validation")), _fmt(_mean_ndcg(r, "test"))
  readme = _line(_text("README.md"), rf"^\| {row} \|")
  assert _cells(readme) == [val, test]
  assert f"{row} {test} (" in " ".join(_text("configs/movielens.py").split())


@pytest.mark.parametrize("row", ["collab", "sigma", "sigma_no_apf"])
def test_beauty_config_docstring(row):
  test = _json("beauty")[row]["test"]
  line = _line(_text("configs/beauty.py"), rf"^  {row} +R@10 ")
  assert _cells(line)[:2] == [_fmt(test["recall@10"]), _fmt(test["ndcg@10"])]


@pytest.mark.parametrize("row", ["collab", "sigma", "sigma_no_apf", "gr_sid", "gr_id",
                                 "sigma_no_grounding"])
def test_scientific_config_table(row):
  r = _json(SCIENTIFIC[row])[row]
  line = _line(_text("configs/scientific.py"), rf"^  {row}[ (]")
  assert _cells(line) == [_fmt(r["test"][k]) for k in KEYS] + [_fmt(r["validation"]["ndcg@10"])]
