"""Small I/O helpers: every artifact is written to a temporary path and renamed into place.

In a multi-process run only process 0 writes (the work directory is shared); the writers here
are no-ops on the other processes.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np


def is_writer() -> bool:
  """True on the process that writes files: process 0 (the only one, in most runs)."""
  import jax  # imported here: the data-only helpers must not start JAX before the user does
  return jax.process_index() == 0


def atomic_write(path: str, write, mode: str):
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (temp file, then rename)."""
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def write_bytes(path: str, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data), "wb")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def save_npy(path: str, array) -> None:
  """Saves a NumPy array atomically."""
  atomic_write(path, lambda f: np.save(f, np.asarray(array)), "wb")


def append_jsonl(path: str, record: dict) -> None:
  """Appends one JSON line (metrics logs; a torn last line is ignored by readers)."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list:
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a line torn by a kill: everything before it is intact
  return out


def truncate_jsonl(path: str, keep) -> None:
  """Rewrites a JSON-lines log atomically, keeping the records for which ``keep(record)``."""
  if os.path.exists(path):
    kept = [r for r in read_jsonl(path) if keep(r)]
    write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
