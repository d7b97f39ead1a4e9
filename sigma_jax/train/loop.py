"""The one training loop every training stage (collab, pretrain, ground, sft) runs.

A stage supplies a jitted step and what to log; the loop does the rest, the same way for all:

* **restore**: the newest readable checkpoint of ``WORKDIR/<stage>/ckpt`` (state and ``meta``),
  and the metrics log cut back to the restored step, so a killed run resumes where it saved and
  re-logs nothing twice;
* **the NaN guard**: every step's metrics are checked before each log line and each checkpoint,
  so a non-finite loss never becomes a checkpoint (`NonFiniteLossError` names the step);
* **cadence**: a log line every ``log_every`` steps and at every checkpoint, a checkpoint every
  ``ckpt_every`` steps and at the end (logged first: a kill between the two only re-logs), so
  the log has a line for every step a run can resume from;
* **metrics**: each log line goes to ``WORKDIR/<stage>/metrics.jsonl`` and, as scalars, to
  TensorBoard event files in ``WORKDIR/<stage>/tensorboard/`` (``tensorboard --logdir WORKDIR``);
  a resumed run hides the events logged after its checkpoint;
* **progress**: one tqdm bar.

``meta`` is the JSON-serialisable bookkeeping saved beside the state; ``meta["step"]`` is the
number of steps done, and batches are a pure function of it, so a resumed run sees the same
batches. A stage ends training early (early stopping) by setting ``meta["done"]``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import numpy as np
import tensorboardX
from tqdm.auto import tqdm

from sigma_jax import checkpoint, utils, workdir as wd


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf; the last good checkpoint is left untouched."""


def check_finite(stage: str, pending: list, ckpt: checkpoint.Checkpointer) -> None:
  """Raises `NonFiniteLossError` naming the first step whose loss or gradient is NaN or Inf.

  Args:
    stage: the stage name, for the message.
    pending: (step, metrics) pairs not checked yet, metrics as device scalars; emptied when all
      are finite.
    ckpt: the stage's checkpointer (asked for the last good step only on failure).
  """
  for step, m in jax.device_get(pending):
    bad = {k: float(v) for k, v in m.items() if not np.all(np.isfinite(v))}
    if bad:
      raise NonFiniteLossError(
          f"stage {stage}, step {step}: non-finite loss or gradient {bad}; training stopped, "
          f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
  pending.clear()


# step_fn(state, step) -> (state, metrics, units): one update on batch number `step`. `metrics`
# are device scalars; `units` (a host number: tokens, pairs, examples of the global batch) is
# summed between log lines into the rate handed to `log_fn`.
StepFn = Callable[[Any, int], tuple[Any, dict, float]]
# log_fn(state, meta, metrics, units_per_s) -> (state, record): at each log point, with the
# step's metrics on the host. `record` becomes one metrics.jsonl line (the loop adds "step").
LogFn = Callable[[Any, dict, dict, float], tuple[Any, dict]]


@dataclasses.dataclass
class Loop:
  """How a stage's training runs.

  Attributes:
    stage: the stage name: its directory under the work directory, the bar's label, messages.
    workdir: the run's work directory.
    total_steps: steps of the whole run.
    log_every: steps between log lines (and NaN checks).
    ckpt_every: steps between checkpoints.
    progress: show the progress bar.
    local: the state lives on this process's devices only (a host-local stage).
    ckpt_number: the checkpoint number of a ``meta`` (default its step; collab numbers by epoch).
    resumed: the log message after a restore, formatted with ``meta``.
    postfix: record keys shown on the bar.
  """
  stage: str
  workdir: str
  total_steps: int
  log_every: int
  ckpt_every: int
  progress: bool = True
  local: bool = False
  ckpt_number: Callable[[dict], int] = lambda meta: meta["step"]
  resumed: str = "resumed at step {step}"
  postfix: tuple = ("loss",)


def _scalars(record: dict, prefix: str = ""):
  """(tag, value) of every number in a log record, nested dicts as 'outer/inner'."""
  for k, v in record.items():
    if isinstance(v, dict):
      yield from _scalars(v, f"{prefix}{k}/")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      yield f"{prefix}{k}", float(v)


class _Events:
  """TensorBoard event files of one stage, written by process 0 only."""

  def __init__(self, workdir: str, stage: str, resumed_at: int):
    self._w = None
    if utils.is_writer():
      self._w = tensorboardX.SummaryWriter(
          logdir=wd.tensorboard_dir(workdir, stage), flush_secs=30,
          purge_step=resumed_at + 1 if resumed_at else None)

  def write(self, record: dict, step: int) -> None:
    if self._w is not None:
      for tag, value in _scalars(record):
        self._w.add_scalar(tag, value, step)

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def train(loop: Loop, state, meta: dict, step_fn: StepFn, log_fn: LogFn, *,
          begin: Callable[[Any, dict], dict] | None = None,
          stop_after: int | None = None) -> tuple[Any, dict, bool]:
  """Runs (or resumes, or skips, when finished) a stage's training.

  Args:
    loop: the stage's settings.
    state: the freshly initialised state pytree (sharded); also the restore target.
    meta: the fresh bookkeeping, with ``meta["step"] == 0``.
    step_fn, log_fn: see `StepFn` and `LogFn`.
    begin: ``begin(state, meta) -> meta`` after any restore, before the first step (measures
      taken before training, recorded once in ``meta``).
    stop_after: stop after this many steps in this call, unfinished and resumable (for
      time-limited jobs); None runs to the end.

  Returns:
    (state, meta, finished).
  """
  ckpt = checkpoint.Checkpointer(wd.ckpt_dir(loop.workdir, loop.stage), max_to_keep=2,
                                 local=loop.local)
  restored = ckpt.restore(state)  # into the shapes and shardings of `state`
  if restored is not None:
    _, state, meta = restored
    logging.info("%s: %s", loop.stage, loop.resumed.format(**meta))
  metrics_path = wd.metrics_log(loop.workdir, loop.stage)
  # Lines logged after the restored checkpoint (then killed) are dropped; they will be re-logged.
  utils.truncate_jsonl(metrics_path, lambda r: r["step"] <= meta["step"])
  if begin is not None:
    meta = begin(state, meta)

  total = int(loop.total_steps)
  finished = lambda: meta["step"] >= total or bool(meta.get("done"))
  bar = tqdm(total=total, initial=meta["step"], desc=loop.stage, dynamic_ncols=True,
             disable=not loop.progress)
  events = _Events(loop.workdir, loop.stage, meta["step"])
  t0, units, pending, run_steps = time.time(), 0.0, [], 0
  try:
    while not finished():
      if stop_after is not None and run_steps >= stop_after:
        break
      state, m, n = step_fn(state, meta["step"])
      meta["step"] += 1
      run_steps += 1
      units += n
      pending.append((meta["step"], m))
      bar.update(1)
      save = meta["step"] % int(loop.ckpt_every) == 0 or meta["step"] == total
      if meta["step"] % int(loop.log_every) == 0 or save:
        check_finite(loop.stage, pending, ckpt)
        rate = units / max(1e-9, time.time() - t0)
        state, record = log_fn(state, meta, {k: float(v) for k, v in
                                             jax.device_get(m).items()}, rate)
        t0, units = time.time(), 0.0
        utils.append_jsonl(metrics_path, dict(record, step=meta["step"]))
        events.write(record, meta["step"])
        bar.set_postfix({k: f"{record[k]:.3f}" for k in loop.postfix if k in record})
      if save or meta.get("done"):
        ckpt.save(loop.ckpt_number(meta), state, meta)
  finally:
    bar.close()
    events.close()
    ckpt.close()  # waits for the last asynchronous save
  return state, meta, finished()
