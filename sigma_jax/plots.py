"""Figures of a work directory, written as PNGs to ``WORKDIR/plots/``.

  curves_<stage>.png   training curves of every stage that wrote ``<stage>/metrics.jsonl``:
                       one panel per logged metric against the step
  codebook_usage.png   share of each SID level's codebook in use (``tokenize/report.json``),
                       and how many items share each prefix bucket
  apf_tradeoff.png     APF's accuracy–diversity trade-off: HR@10 against category coverage@10
                       on the validation split for several τ, one curve per task
  apf_tradeoff.json    the numbers of that figure; the sweep itself is
                       ``sigma_jax.eval.tau.sweep``, cached in ``WORKDIR/tau_sweep.json`` (each τ
                       runs the generator once per task; cached τ values are not run again)

The sweep uses validation only, so choosing τ from it does not touch the test split.
"""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, CI or Colab kernels
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from sigma_jax import utils  # noqa: E402
from sigma_jax.eval import tau as tau_lib  # noqa: E402

# APF temperatures swept by default: from sharp (accuracy) to flat (diversity) item
# distributions around the default 0.01.
DEFAULT_TAUS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# Per-step bookkeeping, not learning curves.
_SKIP = ("step", "epoch")
_SKIP_SUFFIX = ("_s", "time_s", "per_s")


def plots_dir(workdir: str) -> str:
  return os.path.join(workdir, "plots")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[key] = float(v)
  return out


def _curve_keys(records: list) -> list:
  """Metric names worth a panel: losses first, then the rest; no timing, no duplicates."""
  keys = []
  for r in records:
    for k in r:
      if k not in keys:
        keys.append(k)
  leaf = lambda k: k.rsplit("/", 1)[-1]
  keys = [k for k in keys if k not in _SKIP and not k.endswith(_SKIP_SUFFIX)
          # recall@k equals hr@k with one target; invalid@k is 0 by construction.
          and not leaf(k).startswith(("recall@", "invalid@"))]
  return sorted(keys, key=lambda k: ("loss" not in k, keys.index(k)))


def training_curves(workdir: str, out_dir: str | None = None, max_panels: int = 12) -> list:
  """One PNG per stage with a ``metrics.jsonl``; returns their paths."""
  out_dir = out_dir or plots_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for stage in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    raw = utils.read_jsonl(path)  # a torn last line from a killed run is dropped
    records = [_flatten(r) for r in raw]
    keys = _curve_keys(records)[:max_panels]
    if not keys:
      continue
    xname = "step" if all("step" in r for r in raw) else (
        "epoch" if all("epoch" in r for r in raw) else "record")
    xs = [r.get(xname, i) for i, r in enumerate(raw)]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
      pts = [(x, r[key]) for x, r in zip(xs, records) if key in r]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
              markersize=3)
      ax.set_title(key, fontsize=10)
      ax.set_xlabel(xname)
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
      ax.axis("off")
    fig.suptitle(f"{stage}: training curves ({len(raw)} records)")
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, f"curves_{stage}.png")))
  return paths


def codebook_usage(workdir: str, out_dir: str | None = None) -> str | None:
  """Bar chart of the codebook share used per SID level (None before the tokenize stage)."""
  report_path = os.path.join(workdir, "tokenize", "report.json")
  if not os.path.isfile(report_path):
    return None
  with open(report_path) as f:
    report = json.load(f)
  usage = report["usage_per_level"]
  used = report.get("used_codes_per_level", [None] * len(usage))
  size = report.get("codebook_size")
  sizes = None
  try:
    from sigma_jax.train import tokenize as tokenize_stage
    sizes = np.asarray(tokenize_stage.load(workdir)["bucket_sizes"])
  except Exception:  # an older or partial tokenize stage: the usage panel alone
    sizes = None
  fig, axes = plt.subplots(1, 2 if sizes is not None else 1, figsize=(10 if sizes is not None
                                                                     else 5, 3.6), squeeze=False)
  ax = axes[0, 0]
  levels = np.arange(1, len(usage) + 1)
  bars = ax.bar(levels, usage, color="tab:blue")
  for b, u in zip(bars, used):
    if u is not None:
      ax.annotate(f"{u}/{size}", (b.get_x() + b.get_width() / 2, b.get_height()),
                  ha="center", va="bottom", fontsize=9)
  ax.set_ylim(0, 1.1)
  ax.set_xticks(levels)
  ax.set_xlabel("SID level")
  ax.set_ylabel("share of codebook used")
  ax.set_title(f"codebook usage ({report.get('source', 'tokenizer')}, "
               f"{report.get('num_items', '?')} items)")
  if sizes is not None:
    ax = axes[0, 1]
    ax.hist(sizes, bins=min(40, max(5, len(np.unique(sizes)))), color="tab:orange")
    ax.set_xlabel("items per prefix bucket")
    ax.set_ylabel("prefixes")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(f"{len(sizes)} prefixes, largest bucket {int(sizes.max())}")
  fig.tight_layout()
  return _save(fig, os.path.join(plots_dir(workdir) if out_dir is None else out_dir,
                                 "codebook_usage.png"))


def apf_sweep(cfg, workdir: str, taus=DEFAULT_TAUS, limit: int | None = 64, tasks=None,
              generator=None, force: bool = False) -> dict:
  """HR@10 and category coverage@10 per task for each τ, on the validation split.

  Args:
    cfg: the experiment config.
    workdir: a work directory with a finished SFT stage.
    taus: APF temperatures.
    limit: examples per task (the first ones); None: all.
    tasks: task names (default: every available task).
    generator: a loaded (dataset, Generator, step) to reuse; loaded from ``workdir`` if None.
    force: evaluate every τ again, even those ``WORKDIR/tau_sweep.json`` holds.

  Returns (also written to ``plots/apf_tradeoff.json``):
    {"settings": ..., "taus": [...], "sft_step": ..., "tasks": {task: {"hr@10": [per τ],
     "category_coverage@10": [per τ], "num_examples": M}}}.
  """
  res = tau_lib.sweep(cfg, workdir, taus, limit=limit, tasks=tasks, generator=generator,
                      force=force)
  keys = [tau_lib.key(t) for t in taus]
  names = sorted({name for k in keys for name in res["metrics"][k]})
  out = {"settings": res["settings"], "taus": res["taus"],
         "sft_step": res["settings"]["sft_step"], "tasks": {}}
  for name in names:
    per_tau = [res["metrics"][k].get(name) for k in keys]
    if any(m is None for m in per_tau):
      continue
    out["tasks"][name] = {"hr@10": [m["hr@10"] for m in per_tau],
                          "category_coverage@10": [m["category_coverage@10"] for m in per_tau],
                          "num_examples": int(per_tau[-1]["num_examples"])}
  os.makedirs(plots_dir(workdir), exist_ok=True)
  with open(os.path.join(plots_dir(workdir), "apf_tradeoff.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def apf_tradeoff(sweep: dict, out_path: str) -> str:
  """Plots an `apf_sweep` result: HR@10 (y) against category coverage@10 (x).

  One line per task through its τ values; the marker grows with τ (a flatter item
  distribution), so a line reads from the accuracy end to the diversity end.
  """
  fig, ax = plt.subplots(figsize=(7.5, 5))
  taus = sweep["taus"]
  sizes = np.linspace(15, 110, len(taus))
  for k, (name, row) in enumerate(sweep["tasks"].items()):
    color = f"C{k % 10}"
    x, y = row["category_coverage@10"], row["hr@10"]
    ax.plot(x, y, color=color, alpha=0.7, label=f"{name} (n={row['num_examples']})")
    ax.scatter(x, y, s=sizes, color=color, edgecolors="black", linewidths=0.4, zorder=3)
  # A key for the marker sizes.
  for t, sz in zip(taus, sizes):
    ax.scatter([], [], s=sz, color="lightgray", edgecolors="black", linewidths=0.4,
               label=f"τ = {t:g}")
  ax.set_xlabel("category coverage@10 (diversity)")
  ax.set_ylabel("HR@10 (accuracy)")
  ax.set_title(f"APF accuracy–diversity trade-off (validation, SFT step {sweep['sft_step']})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  fig.tight_layout()
  return _save(fig, out_path)


def make_all(cfg, workdir: str, taus=DEFAULT_TAUS, limit: int | None = 64,
             sweep: bool = True, generator=None) -> dict:
  """Every figure the work directory has the artifacts for.

  Args:
    cfg: the experiment config (needed for the APF sweep only).
    workdir: the work directory.
    taus, limit: the APF sweep's temperatures and examples per task.
    sweep: run (or reuse) the APF sweep; it needs a finished SFT stage.
    generator: a loaded (dataset, Generator, step) for the sweep.

  Returns:
    {figure name: PNG path}.
  """
  out = {}
  for p in training_curves(workdir):
    out[os.path.splitext(os.path.basename(p))[0]] = p
  p = codebook_usage(workdir)
  if p:
    out["codebook_usage"] = p
  if sweep and tau_lib.sft_step(workdir) is not None:
    result = apf_sweep(cfg, workdir, taus, limit, generator=generator)
    out["apf_tradeoff"] = apf_tradeoff(result, os.path.join(plots_dir(workdir),
                                                            "apf_tradeoff.png"))
  return out


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
