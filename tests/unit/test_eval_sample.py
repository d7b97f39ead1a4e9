"""Which validation or test examples a limit keeps (`evaluate.limit_examples`,
`generation.eval_sample`): the first ones in file order, or a seeded random sample."""
import ml_collections
import numpy as np
import pytest

from sigma_jax.data import tasks
from sigma_jax.eval import evaluate

N = 500


def _examples(task="justforyou", split="validation", n=N):
  hist = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
  return tasks.TaskExamples(
      task=task, split=split, user=np.arange(n), position=np.full(n, 3, np.int32), history=hist,
      target=np.arange(n, dtype=np.int32) + 10_000, timestamp=None,
      template=np.zeros(n, np.int32), instruction=[f"instr {i}" for i in range(n)],
      constraint=None, constraint_names=None, hard_constraint=False)


def _g(sample="random", seed=0):
  return ml_collections.ConfigDict(dict(eval_sample=sample, eval_sample_seed=seed))


def test_first_keeps_the_head_and_no_limit_keeps_everything():
  ex = _examples()
  assert evaluate.limit_examples(ex, None, _g()) is ex
  assert evaluate.limit_examples(ex, N, _g()) is ex  # nothing to sample
  np.testing.assert_array_equal(evaluate.limit_examples(ex, 40).target, ex.target[:40])
  head = evaluate.limit_examples(ex, 40, _g("first"))
  np.testing.assert_array_equal(head.target, ex.target[:40])
  np.testing.assert_array_equal(head.history, ex.history[:40])


def test_random_is_seeded_uniform_and_aligned():
  ex = _examples()
  a = evaluate.limit_examples(ex, 100, _g())
  again = evaluate.limit_examples(_examples(), 100, _g())
  other = evaluate.limit_examples(ex, 100, _g(seed=1))
  rows = a.user  # user i is row i here
  assert len(set(rows.tolist())) == 100 and np.all(np.diff(rows) > 0)  # distinct, file order
  np.testing.assert_array_equal(rows, again.user)  # the same seed: the same examples
  assert not np.array_equal(rows, other.user)
  # Every field is taken from the same rows.
  np.testing.assert_array_equal(a.target, rows + 10_000)
  np.testing.assert_array_equal(a.history, ex.history[rows])
  assert a.instruction == [f"instr {i}" for i in rows]
  # Not the head of the file: drawn from all of it.
  assert rows.max() > N // 2 and rows.min() < N // 2
  # Another task or split draws another sample from the same seed.
  assert not np.array_equal(
      rows, evaluate.limit_examples(_examples(split="test"), 100, _g()).user)
  assert not np.array_equal(
      rows, evaluate.limit_examples(_examples(task="longtail"), 100, _g()).user)


def test_sample_is_described_and_checked():
  g = _g(seed=3)
  assert evaluate.sample_description(None, g) == "all"
  assert evaluate.sample_description(50, g) == "random 50 (seed 3)"
  g.eval_sample = "first"
  assert evaluate.sample_description(50, g) == "first 50"
  with pytest.raises(ValueError, match="generation.eval_sample must be"):
    evaluate.limit_examples(_examples(), 10, _g("last"))
