"""Two processes on this CPU machine (JAX CPU collectives, a loopback coordinator) compute the
same SFT losses, parameters and recommendations as one process with the same global mesh; and a
killed process stops its peer with an error instead of a hang."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SUBPROCESS_XLA_FLAGS

pytestmark = pytest.mark.slow
DEVICES = 4  # global devices: 1 process x 4, or 2 processes x 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices: int) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={local_devices} "
                      f"{SUBPROCESS_XLA_FLAGS}")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SIGMA_TEST_JAX_CACHE"])
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _cmd(workdir, out, *extra):
  return [sys.executable, "-m", "launch.multihost_check", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--out={out}", *extra]


def _two(workdir, out, *extra, port):
  return [subprocess.Popen(
      _cmd(workdir, out, "--num_processes=2", f"--process_id={i}",
           f"--coordinator_address=127.0.0.1:{port}", *extra),
      cwd=ROOT, env=_env(DEVICES // 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


def test_two_processes_equal_one(demo_workdir, tmp_path):
  one, two = tmp_path / "one.npz", tmp_path / "two.npz"
  # All three at once: most of each run is single-threaded compilation.
  ref = subprocess.Popen(_cmd(demo_workdir, one, "--distributed=off"), cwd=ROOT,
                         env=_env(DEVICES), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
  procs = _two(demo_workdir, two, port=_free_port())
  try:
    outs = [p.communicate(timeout=300) for p in procs]
    _, ref_err = ref.communicate(timeout=300)
  finally:
    for p in procs + [ref]:
      p.kill()
  assert ref.returncode == 0, ref_err[-3000:]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Process 0 alone reports (Gloo itself prints connection lines on every process).
  assert '"processes": 2' in outs[0][0] and '"processes"' not in outs[1][0]
  a, b = np.load(one), np.load(two)
  assert len(a["losses"]) == 3
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b["params"], a["params"], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a["losses"][0], a["losses"][-1])  # it did train
  np.testing.assert_array_equal(b["items"], a["items"])
  assert (a["items"] >= 0).all()


def test_killed_process_stops_its_peer(demo_workdir, tmp_path):
  procs = _two(demo_workdir, tmp_path / "never.npz", "--steps=1000",
               "--heartbeat_timeout_s=10", port=_free_port())
  try:
    # Kill process 1 as soon as the runtime has connected both; process 0 goes on working
    # towards its first collective, which can never complete.
    while True:
      line = procs[1].stderr.readline()
      assert line, "process 1 ended before connecting"
      if "distributed: process 1 of 2" in line:
        break
    procs[1].kill()
    start = time.time()
    _, err = procs[0].communicate(timeout=150)
    assert procs[0].returncode != 0
    assert time.time() - start < 150
    assert "another task died" in err or "unhealthy" in err, err[-3000:]
  finally:
    for p in procs:
      p.kill()
