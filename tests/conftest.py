"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import sys

# XLA's backend optimisation off: the tests are dominated by compiling many small programs, and
# level 0 halves the in-process tests' CPU time. Every process of the suite (in-process tests and
# the subprocesses they start, `SUBPROCESS_XLA_FLAGS`) compiles with the same flag, so results
# compared across processes (kill-and-resume: bitwise) come from the same kind of program.
_OPT = "--xla_backend_optimization_level=0"
SUBPROCESS_XLA_FLAGS = _OPT  # one CPU device
for _flag in ("--xla_force_host_platform_device_count=8", _OPT):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
assert "jax" not in sys.modules or os.environ["XLA_FLAGS"], "JAX imported before conftest"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The public datasets: $SIGMA_DATA_DIR, by default shared/data beside the checkout (as in CI).
# Set here, before any test starts a subprocess, so every pipeline run reads the same files.
os.environ.setdefault("SIGMA_DATA_DIR", os.path.join(os.path.dirname(_ROOT), "shared", "data"))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than about 10 s on 2 cores, counting a "
                          "fixture it builds (still runs in CI; `-m 'not slow'` leaves it out)")
  # One persistent JAX compilation cache for every subprocess run of the session: the pipeline
  # runs (fixture, kill-and-resume, CLI, notebook) compile the same programs.
  import tempfile
  cache = os.environ.setdefault("SIGMA_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="sigma_jax_cache_"))
  # The in-process tests too (both xdist workers inherit the directory): stages and tests build
  # their jitted functions afresh per call, so the same program is compiled again by later
  # tests, by the other worker and by the pipeline subprocesses; the persistent cache serves it.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_compilation_cache_dir",
                                     os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="session")
def data_root():
  """The directory holding the original public datasets (../shared/data in CI)."""
  root = os.environ.get("SIGMA_DATA_DIR")
  if not root:
    raise RuntimeError("SIGMA_DATA_DIR is empty; point it at the shared data directory.")
  if not os.path.isdir(root):
    raise RuntimeError(f"SIGMA_DATA_DIR={root} is not a directory (the public datasets: "
                       "amazon2014/Beauty, amazon2018/Scientific, ml-latest-small)")
  return root


ROOT = _ROOT
# The demo pipeline, shrunk further so the suite stays fast; tests that need a trained work
# directory share one run (session fixture below).
FAST_DEMO = ("--config.collab.epochs=2", "--config.ground.steps=40", "--config.sft.steps=60",
             "--config.generation.eval_limit=40")


def run_train(workdir, *overrides, config="configs/demo.py", timeout=600, check=True):
  """`python -m launch.train` in a subprocess on one CPU device, as a user would run it."""
  import subprocess
  env = dict(os.environ)
  env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SIGMA_TEST_JAX_CACHE"])
  out = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
       *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and out.returncode != 0:
    raise AssertionError(f"launch.train failed ({out.returncode}):\n{out.stderr[-4000:]}")
  return out


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
  """A work directory with every stage of the (fast) demo pipeline done.

  Under pytest-xdist the workers share one run: the first to need it builds it under a file
  lock in the session's common temporary directory; the others wait for it, then read it.
  """
  import fcntl
  from sigma_jax import workdir as wd
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # common to every worker of this session
  workdir = base / "demo_run"
  with open(base / "demo_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not wd.is_done(str(workdir), "eval"):  # eval: the pipeline's last stage
      run_train(str(workdir), *FAST_DEMO)  # resumable, should a worker have died mid-run
  return str(workdir)


def synthetic_assets(mode: str = "sigma", *, items: int = 40, levels: int = 2, codes: int = 4,
                     dedup: int = 3, spm: int = 1000, beams: int = 10, seed: int = 0):
  """(cfg, assets) of a tiny synthetic catalogue for in-process decoder tests: the demo config
  (its `gr_sid` variant for that mode) with ``levels`` SID levels of ``codes`` codes plus a
  de-duplication level of ``dedup``, ``items`` distinct random SIDs, unit random features, a
  `generate.testing.SyntheticTokenizer` of ``spm`` text tokens, K = top_n = ``beams``."""
  import numpy as np

  from configs import demo
  from sigma_jax.generate import testing
  from sigma_jax.models import rq
  from sigma_jax.train import sft
  cfg = demo.get_config("gr_sid" if mode == "gr_sid" else None)
  cfg.generation.mode = mode
  cfg.tokenizer.levels, cfg.tokenizer.codebook_size, cfg.tokenizer.prefix_len = levels, codes, 1
  cfg.text.vocab_size = spm
  cfg.generation.num_beams = cfg.generation.top_n = beams
  rng = np.random.default_rng(seed)
  sids = testing.synthetic_sids(rng, items, (codes,) * levels + (dedup,))  # distinct full SIDs
  feats = rng.normal(size=(items, 8)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  tok = testing.SyntheticTokenizer(spm, levels, codes, dedup)
  return cfg, sft.make_assets(cfg, tok, sids, feats, rq.prefix_buckets(sids, 1)[:3])
