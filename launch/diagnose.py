r"""Validation diagnostics behind the choices in docs/RESULTS.md (nothing here touches test
unless asked with --splits).

  # How much of SASRec's ranking comes from its item norms: dot product vs cosine scores.
  python -m launch.diagnose --config=configs/beauty.py --workdir=runs/beauty --what=collab_cosine

  # A trained SIGMA model's validation NDCG@10 at other decoding settings (beams K, items per
  # prefix M, APF τ), on the first --limit validation examples.
  python -m launch.diagnose --config=configs/beauty.py --workdir=runs/beauty_v2/rows/sigma \
      --what=decoding --beams=20,64 --top_m=20 --taus=0.003 --limit=3000

Prints a Markdown table.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (the row's, for decoding).")
_WHAT = flags.DEFINE_enum("what", None, ["collab_cosine", "decoding"], "Which diagnostic.")
_SPLITS = flags.DEFINE_list("splits", ["validation"], "Splits to report (collab_cosine).")
_BEAMS = flags.DEFINE_list("beams", ["20"], "Beam widths K (decoding).")
_TOP_M = flags.DEFINE_list("top_m", ["20"], "Items kept per prefix M (decoding).")
_TAUS = flags.DEFINE_list("taus", ["0.003"], "APF τ values (decoding).")
_LIMIT = flags.DEFINE_integer("limit", 3000, "Validation examples per task (decoding; 0: all).")
flags.mark_flags_as_required(["config", "workdir", "what"])


def collab_cosine(cfg, workdir: str, splits) -> list:
  """SASRec's best-epoch parameters ranked by h·e_i (as trained) and by h·e_i/|e_i| (cosine)."""
  from sigma_jax.checkpoint import Checkpointer
  from sigma_jax.data import loader
  from sigma_jax.eval.metrics import ranking_metrics
  from sigma_jax.train import collab

  sp = loader.load_dataset(cfg, workdir).splits
  ccfg, n = cfg.collab, sp.num_items
  tx = collab.make_optimizer(float(ccfg.learning_rate), float(ccfg.weight_decay))
  _, abstract, _ = collab._state_fns(n, ccfg, int(cfg.seed), tx)
  with Checkpointer(os.path.join(workdir, "collab", "ckpt"), max_to_keep=2, local=True) as ck:
    restored = ck.restore(abstract)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/collab/ckpt holds no checkpoint")
  params = restored[1]["best_params"]
  graphdef = nnx.split(nnx.eval_shape(lambda: collab.build_model(n, ccfg, int(cfg.seed))),
                       nnx.Param)[0]
  exclude = collab.exclude_history(cfg)

  @jax.jit
  def top(params, hist, cosine):
    model = nnx.merge(graphdef, params)
    h, e = model(hist)[:, -1], model.item_embeddings()
    e = jnp.where(cosine, e / jnp.linalg.norm(e, axis=1, keepdims=True), e)
    s = h @ e.T
    return jax.lax.top_k(collab.mask_history(s, hist) if exclude else s, 20)[1]

  data = {"validation": (sp.valid_hist, sp.valid_target), "test": (sp.test_hist, sp.test_target)}
  norms = np.linalg.norm(np.asarray(nnx.merge(graphdef, params).item_embeddings()), axis=1)
  counts = np.bincount(np.concatenate(sp.train_seqs), minlength=n)
  print(f"corr(|e_i|, log(1 + train count_i)) = "
        f"{np.corrcoef(norms, np.log1p(counts))[0, 1]:+.3f}")
  lines = ["| scoring | split | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|---|"]
  for cosine in (False, True):
    for split in splits:
      hist, target = data[split]
      hist = np.asarray(hist)[:, -int(ccfg.max_len):]
      rows = 256
      out = []
      for s in range(0, len(hist), rows):
        chunk = hist[s:s + rows]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk), 0)])
        out.append(np.asarray(top(params, pad, cosine))[:len(chunk)])
      r = ranking_metrics(np.concatenate(out), target, (5, 10), num_items=n)
      lines.append(f"| {'cosine' if cosine else 'dot (as trained)'} | {split} | "
                   f"{r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {r['recall@10']:.4f} | "
                   f"{r['ndcg@10']:.4f} |")
  return lines


def decoding(cfg, workdir: str) -> list:
  from sigma_jax.eval import stage as eval_stage
  from sigma_jax.train import sft

  names = sft.task_list(cfg.generation.eval_tasks)
  lines = ["| K | M | τ | validation mean NDCG@10 | R@10 |", "|---|---|---|---|---|"]
  for k in _BEAMS.value:
    for m in _TOP_M.value:
      c = cfg.copy_and_resolve_references()
      c.generation.num_beams, c.generation.top_m = int(k), int(m)
      ds, gen, _ = eval_stage.load_generator(c, workdir)
      for tau in _TAUS.value:
        res = eval_stage.evaluate(c, ds, gen, splits=("validation",), task_names=names,
                                  tau=float(tau), limit=_LIMIT.value or None, progress=False)
        ndcg = np.mean([r["validation"]["ndcg@10"] for r in res.values()])
        hr = np.mean([r["validation"]["hr@10"] for r in res.values()])
        lines.append(f"| {k} | {m} | {tau} | {ndcg:.4f} | {hr:.4f} |")
  return lines


def main(argv):
  del argv
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  if _WHAT.value == "collab_cosine":
    lines = collab_cosine(cfg, workdir, _SPLITS.value)
  else:
    lines = decoding(cfg, workdir)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
