"""Round trips of sigma_jax.checkpoint.Checkpointer, sharded and corrupted."""
import asyncio
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sigma_jax.checkpoint import Checkpointer


def _state(scale):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(jnp.arange(16.0).reshape(8, 2) * scale,
                           NamedSharding(mesh, P("data", None)))
  return {"w": sharded, "b": jnp.full((3,), scale, jnp.float32),
          "step": jnp.asarray(int(scale), jnp.int32)}


def test_round_trip_sharded_and_meta(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.restore(jax.eval_shape(lambda: _state(1.0))) is None
  state = _state(3.0)
  meta = {"config": {"lr": 1e-3}, "data_position": {"seed": 0, "epoch": 2, "step": 0},
          "best": [0.5, None]}
  ckpt.save(7, state, meta)
  ckpt.wait()
  assert ckpt.latest_step() == 7

  abstract = jax.eval_shape(lambda: _state(1.0))  # keeps the NamedSharding of "w"
  step, restored, meta2 = ckpt.restore(abstract)
  assert step == 7 and meta2 == meta
  assert restored["w"].sharding == state["w"].sharding
  assert len(restored["w"].addressable_shards) == 8
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
  ckpt.close()


def test_fallback_on_corrupt_latest(tmp_path, caplog):
  d = tmp_path / "ck"
  ckpt = Checkpointer(str(d), max_to_keep=3)
  ckpt.save(1, _state(1.0), {"epoch": 1})
  ckpt.save(2, _state(2.0), {"epoch": 2})
  ckpt.wait()
  # Corrupt every file of step 2's state: truncation is what a crash mid-write leaves.
  for root, _, files in os.walk(d / "2" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  with caplog.at_level("WARNING"):
    step, restored, meta = ckpt.restore(jax.eval_shape(lambda: _state(1.0)))
  assert step == 1 and meta == {"epoch": 1}
  np.testing.assert_array_equal(np.asarray(restored["b"]), np.ones(3, np.float32))
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  # Re-saving the corrupt step number replaces it.
  ckpt.save(2, _state(5.0), {"epoch": 2})
  ckpt.wait()
  step, restored, _ = ckpt.restore(jax.eval_shape(lambda: _state(1.0)))
  assert step == 2 and float(restored["b"][0]) == 5.0
  ckpt.close()


def test_meta_is_captured_when_save_is_called(tmp_path, monkeypatch):
  """The training loops keep mutating their meta dict after `save` returns (meta["step"] += 1);
  the asynchronous write must store the values at the call, not whatever the dict holds when
  the background thread gets to it, or a resume pairs step-N weights with a later data position.

  Orbax serialises the JSON in its background commit; a loaded machine delays it. The delay is
  made certain here by slowing that write down.
  """
  handler = ocp.handlers.JsonCheckpointHandler
  write = handler._save_fn

  async def slow_write(self, x, directory):
    await asyncio.sleep(0.5)
    await write(self, x, directory)

  monkeypatch.setattr(handler, "_save_fn", slow_write)
  ckpt = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
  meta = {"step": 10, "best": {"val": 0.5, "steps": [10]}}
  ckpt.save(10, _state(1.0), meta)
  meta["step"] = 11  # what ground/sft do on their very next iteration
  meta["best"]["val"] = 0.9
  meta["best"]["steps"].append(11)
  ckpt.wait()
  _, _, saved = ckpt.restore(jax.eval_shape(lambda: _state(1.0)))
  assert saved == {"step": 10, "best": {"val": 0.5, "steps": [10]}}
  ckpt.close()


def test_meta_that_is_not_json_fails_at_the_call(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"))
  with pytest.raises(TypeError, match="meta"):
    ckpt.save(1, _state(1.0), {"step": 1, "when": object()})
  ckpt.close()
