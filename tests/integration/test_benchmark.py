"""`launch/benchmark.py decode` at tiny sizes: it runs and prints one JSON line of numbers.

Speed itself is measured by the benchmark, not checked here.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sigma_jax.generate import testing

from conftest import ROOT as _ROOT

TINY = ["--backbone=tiny", "--text_vocab=60", "--codebook=8", "--items=100", "--batches=1,2",
        "--num_beams=4", "--prompt_len=6", "--reps=2", "--ref_reps=1",
        "--constraint_items=50,300", "--constraint_batch=2", "--constraint_reps=3"]


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x > 0


def _run_benchmark(*args, timeout: int) -> dict:
  """`python -m launch.benchmark ARGS` on one CPU device; its one JSON line, parsed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  # One device: the benchmark's numbers are for the real machine, not 8 fake devices.
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")
  proc = subprocess.run([sys.executable, "-m", "launch.benchmark", *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0])


@pytest.mark.slow
def test_decode_prints_one_json_line_of_positive_numbers():
  out = _run_benchmark("decode", *TINY, timeout=120)
  assert out["benchmark"] == "decode"
  for key in ("jax", "cpu_count", "devices", "backend"):
    assert out["machine"][key]
  assert set(out["recs_per_s"]) == {"batch_1", "batch_2"}
  for rec in out["recs_per_s"].values():
    assert _positive(rec["device"]) and _positive(rec["host"])
  assert _positive(out["speedup"])
  assert all(_positive(v) for v in out["speedup_by_batch"].values())
  assert all(_positive(v) for v in out["speedup_search_only"].values())
  for r in out["search"]:
    for key in ("device_ms", "host_ms", "prefill_ms", "speedup"):
      assert _positive(r[key]), (key, r)
    # Both searches return only catalogue SIDs, and (up to float near-ties) the same beams.
    assert r["all_in_catalogue"] and r["valid_beams"] == 1.0
    assert r["agreement"] >= 0.5
  assert set(out["constraint_ms_per_step"]) == {"50", "300"}
  assert all(_positive(v) for v in out["constraint_ms_per_step"].values())
  for r in out["constraint"]:
    assert len(r["ms_per_level"]) == 3 and all(_positive(v) for v in r["ms_per_level"])
  assert _positive(out["constraint_growth"]) and _positive(out["constraint_growth_mean"])
  assert _positive(out["dispatch_ms"]) and _positive(out["wall_s"])
  # The three figures in one run: MFU of the largest batch's decode, search-only
  # speed-up and constraint growth.
  assert _positive(out["matmul_flops_per_s"]) and 0 < out["mfu_decode"] < 1
  flops = out["decode_flops"]
  assert flops["total"] == pytest.approx(flops["prefill"] + flops["search"])
  largest = out["search"][-1]
  seconds = 1e-3 * (largest["prefill_ms"] + largest["device_ms"])
  assert out["mfu_decode"] == pytest.approx(flops["total"] / seconds / out["matmul_flops_per_s"])
  assert out["search_only_speedup"] == largest["search_only"]["speedup"]


def test_synthetic_sids_are_distinct_and_in_range():
  sids = testing.synthetic_sids(np.random.default_rng(0), 500, (8, 8, 16))
  assert sids.shape == (500, 3)
  assert len({tuple(r) for r in sids.tolist()}) == 500
  assert (sids >= 0).all() and (sids < np.array([8, 8, 16])).all()
  with pytest.raises(ValueError):
    testing.synthetic_sids(np.random.default_rng(0), 11, (2, 5))


@pytest.mark.slow
def test_sft_step_times_both_layouts_on_the_demo_run(demo_workdir):
  out = _run_benchmark("sft_step",
                       "--config=configs/demo.py", f"--workdir={demo_workdir}",
                       "--timed_steps=2",
                       "--config.sft.layout=per_position", "--config.sft.batch_size=16",
                       # rows of 256 tokens hold at least two of the demo's <= 128-token prompts
                       "--config.sft.max_len=256",
                       timeout=300)
  assert out["benchmark"] == "sft_step" and out["setting"]["steps"] == 2
  assert out["unpacked"]["rows_per_batch"] == 16
  assert 0 < out["packed"]["rows_per_batch"] <= 12
  assert out["packed"]["real_token_fraction"] > out["unpacked"]["real_token_fraction"]
  for lay in ("unpacked", "packed"):
    assert _positive(out[lay]["ms_per_step"]) and _positive(out[lay]["host_build_ms"])
  assert _positive(out["speedup"])
  assert out["loss_rel_diff"] < 1e-4  # the same loss, packed or not


@pytest.mark.slow
def test_profile_prints_mfu_users_per_s_and_parts():
  out = _run_benchmark("profile",
                       "--config=configs/beauty.py:tiny", "--profile_items=300",
                       "--history=4", "--reps=1", "--prompt_len=8",
                       "--matmul_sizes=64x32x128,128x128x128",
                       timeout=300)
  assert out["benchmark"] == "profile"
  for key in ("matmul_flops_per_s", "mfu_sft", "mfu_decode", "mfu_eval", "eval_users_per_s",
              "sft_flops_per_step", "wall_s"):
    assert _positive(out[key]), (key, out[key])
  assert set(out["matmul_flops_per_s_by_shape"]) == {"64x32x128", "128x128x128"}
  parts = out["wall_time_s_by_part"]
  assert set(parts["sft"]) == {"host_batch_build", "forward", "forward_backward", "optimizer",
                               "train_step"}
  assert set(parts["eval"]) == {"host_prompts_and_mask", "prefill", "beam_search", "q_pass",
                                "retrieval_fusion", "generate", "recommend"}
  for group in parts.values():
    assert all(_positive(v) for v in group.values()), group
  # The separately jitted parts chain to the same ranking as the one generate program.
  assert out["eval_parts_agree"] is True
  assert out["setting"]["items"] == 300 and out["setting"]["backbone"] == "tiny"


def test_matmul_params_are_the_decoder_weights_but_embedding_and_norms():
  import jax
  from configs import base
  from sigma_jax import profile
  m = base.backbone("tiny")
  m.vocab_size = 100
  _, params = testing.random_decoder(m, 0)
  counted = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                if not any(s in jax.tree_util.keystr(path) for s in ("embedding", "scale")))
  assert profile.decoder_matmul_params(m) == counted
  # Causal attention: a sequence of L tokens sees L(L+1)/2 keys.
  assert profile.attention_flops(m, [profile._causal_keys([3])]) == 4 * 2 * 4 * 8 * 6


def test_matmul_layouts_times_both_layouts_and_they_agree():
  out = _run_benchmark("matmul_layouts", "--config=configs/beauty.py:tiny", "--reps=1",
                       timeout=120)
  assert out["benchmark"] == "matmul_layouts"
  assert set(out["ms"]) == {f"{n}/{p}" for n in ("mlp_einsum", "mlp_dense", "attention_einsum",
                                                 "attention_grouped")
                            for p in ("forward", "forward_backward")}
  assert all(_positive(v) for v in out["ms"].values()), out["ms"]
  # The two layouts compute the same function; only their speed may differ.
  assert out["layouts_agree"] is True
  assert out["setting"]["d_model"] > 0 and out["setting"]["groups"] >= 1
