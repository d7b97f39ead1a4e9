"""One thin layer over Orbax ``CheckpointManager``: a state pytree plus a JSON ``meta`` per step.

``meta`` holds what is not an array: the config, the data-iterator position, best-so-far
bookkeeping. Restoring goes into an abstract (possibly sharded) target, so arrays land directly
on their devices with their shardings. A latest step that cannot be read (a crash mid-write on a
filesystem without atomic renames, a truncated file) is skipped with a warning, and the newest
readable step before it is used instead.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"


def _abstract(tree: Any) -> Any:
  """Concrete arrays -> ShapeDtypeStruct (keeping shardings); abstract leaves pass through."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves and restores ``(step, state, meta)`` under one directory.

  Attributes:
    directory: absolute path of the checkpoint directory (one sub-directory per step).
  """

  def __init__(self, directory: str, max_to_keep: int = 2, *, async_save: bool = True,
               local: bool = False):
    """Args:
      directory: where the steps go; created if missing.
      max_to_keep: newest steps kept on disk; 2 leaves one to fall back on.
      async_save: write in a background thread (``wait()`` blocks until done).
      local: the state lives on this process's devices only and only this process saves and
        restores it (a host-local stage in a multi-process run). Otherwise every process
        calls ``save`` and ``restore`` together on global arrays.
    """
    self.directory = os.path.abspath(directory)
    multiprocessing = ocp.options.MultiprocessingOptions()
    create = True
    # Orbax serialises only global arrays in a multi-process run: a host-local state goes to
    # disk as NumPy and comes back onto the requested devices.
    self._host_local = bool(local and jax.process_count() > 1)
    if self._host_local:
      os.makedirs(self.directory, exist_ok=True)  # Orbax creates it only for all processes
      create = False
      me = jax.process_index()
      multiprocessing = ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save,
        multiprocessing_options=multiprocessing)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=(_STATE, _META))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves a step (asynchronously when enabled); an existing step of that number is replaced.

    Args:
      step: non-negative int (the training code's epoch or global step).
      state: pytree of arrays (sharded or not).
      meta: JSON-serialisable dict.
    """
    step = int(step)
    # Orbax serialises the JSON in its background commit, after this returns, and the training
    # loops mutate `meta` on their next iteration: a slow writer (a loaded machine) would store a
    # later step's data position beside this step's weights. Snapshot it now; this also turns a
    # non-JSON value into an error here rather than in the background thread.
    try:
      meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint meta for step {step} in {self.directory} is not "
                      f"JSON-serialisable: {e}") from e
    self._mngr.wait_until_finished()
    if step in self._mngr.all_steps():
      # A step restored past (a corrupt newer one) or re-run after a fallback is overwritten.
      self._mngr.delete(step)
    if self._host_local:
      state = jax.device_get(state)
    self._mngr.save(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}), force=True)

  def latest_step(self) -> int | None:
    """The newest finished step on disk, or None."""
    self._mngr.wait_until_finished()
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    self._mngr.wait_until_finished()
    return sorted(self._mngr.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict] | None:
    """Restores a step into the structure, shapes, dtypes and shardings of ``abstract_state``.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or of arrays
        shaped like the saved state (``jax.eval_shape`` of the init function works).
      step: a specific step (no fallback: an unreadable one raises), or None for the newest
        readable step, falling back to older ones with a warning.

    Returns:
      (step, state, meta), or None when nothing has been saved.
    """
    self._mngr.wait_until_finished()
    target = _abstract(abstract_state)
    if step is not None:
      return self._restore_one(int(step), target)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      return None
    for i, s in enumerate(steps):
      try:
        return self._restore_one(s, target)
      except Exception as e:  # pylint: disable=broad-except
        older = steps[i + 1] if i + 1 < len(steps) else None
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); %s", s,
                        self.directory, type(e).__name__, e,
                        f"falling back to step {older}" if older is not None else
                        "no older step to fall back on")
    raise RuntimeError(f"no readable checkpoint in {self.directory} (steps {steps})")

  def _restore_one(self, step: int, target: Any) -> tuple[int, Any, dict]:
    if self._host_local:
      host_target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
      out = self._mngr.restore(step, args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(host_target), _META: ocp.args.JsonRestore()}))
      state = jax.tree.map(
          lambda x, t: jax.device_put(x, getattr(t, "sharding", None) or jax.local_devices()[0]),
          out[_STATE], target)
      return step, state, dict(out[_META])
    out = self._mngr.restore(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
    return step, out[_STATE], dict(out[_META])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
