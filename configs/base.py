"""Defaults shared by every experiment config; each dataset config starts from `base_config()`.

Every field can be overridden on the command line as ``--config.section.field=value``.
"""
import ml_collections


def axis_rules():
  """Logical axis name -> mesh axes. One table for parameters and activations (DESIGN §5)."""
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv_heads", "model"),
      ("kv", None),
      ("vocab", "model"),
      ("item", "fsdp"),
      ("codebook", None),
      ("length", None),
      ("beam", None),
      ("layers", None),
      ("norm", None),
  )


def backbone(size: str) -> ml_collections.ConfigDict:
  """Qwen3-style decoder sizes. `tiny` for tests; `small` is the CPU default."""
  sizes = {
      "tiny": dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64),
      "small": dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                    mlp_dim=384),
      "base": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, head_dim=64,
                   mlp_dim=2048),
  }
  if size not in sizes:
    raise ValueError(f"unknown backbone size {size!r}; choose from {sorted(sizes)}")
  m = ml_collections.ConfigDict(sizes[size])
  m.size = size
  m.vocab_size = 4096
  m.qk_norm = True
  m.tie_embeddings = True
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.max_len = 256
  m.dtype = "float32"
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True  # progress bars on long loops
  # "default": data, text_tokenizer, collab, ground, tokenize, sft, eval (sigma_jax/pipeline.py);
  # or a comma-separated list of stages, which always run in the pipeline's order.
  c.stages = "default"

  c.dataset = ml_collections.ConfigDict()
  # Any name (lower-case letters, digits, '_'); it names the TFDS dataset sigma_<name>, stats
  # and docs/results/<name>.json. Known names: beauty | scientific | movielens | demo.
  c.dataset.name = "beauty"
  # File format: amazon_p5 | unisrec | movielens (docs/DATASETS.md). Empty: the one a known
  # name implies (beauty: amazon_p5, scientific: unisrec, movielens and demo: movielens).
  c.dataset.format = ""
  # The original files; a name that is not a known one needs it. Default for a known name:
  # $SIGMA_DATA_DIR/<its subdirectory> (the demo: sigma_jax/data/demo).
  c.dataset.manual_dir = ""
  c.dataset.tfds_dir = ""  # where the TFDS array_record dataset goes; default WORKDIR/tfds
  c.dataset.max_history = 20  # a history keeps its last max_history items (TIGER's split)
  # Rank the items of a user's own history last, in every row (collab and the generator).
  # Beauty, MovieLens and the demo never repeat an item within a user's sequence (the data
  # stage reports `repeat_share` = 0), so an already-seen item is never the answer there;
  # Scientific repeats 0.49% of its interactions (those targets become unreachable, and the
  # data stage warns). RecBole's full-sort evaluation masks seen items the same way; False
  # ranks the whole catalogue as TIGER's paper does.
  c.dataset.exclude_history = True

  c.text = ml_collections.ConfigDict()
  c.text.vocab_size = 4000  # SentencePiece pieces (incl. specials); SID tokens come on top
  c.text.max_item_tokens = 48  # item text length for the grounding text tower

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.model = 1
  c.axis_rules = axis_rules()

  c.model = backbone("small")

  c.collab = ml_collections.ConfigDict()
  c.collab.d_model = 64
  c.collab.num_blocks = 2
  c.collab.num_heads = 1
  c.collab.dropout = 0.5
  c.collab.max_len = 20
  c.collab.epochs = 40
  c.collab.batch_size = 128
  c.collab.learning_rate = 1e-3
  c.collab.weight_decay = 0.0
  c.collab.eval_every = 1
  c.collab.patience = 10  # epochs without validation gain before stopping
  c.collab.select_metric = "ndcg@10"  # the validation metric that picks the epoch

  # Optional stage `pretrain` (not in the default stages): causal LM over item texts and templates.
  c.pretrain = ml_collections.ConfigDict()
  # auto: ground (and sft, with sft.init="auto") start from WORKDIR/pretrain when it exists;
  # always: an error when it does not; never: they start fresh.
  c.pretrain.use = "auto"
  c.pretrain.steps = 1000
  c.pretrain.batch_size = 64
  c.pretrain.max_len = 48  # tokens per text, <|end|> included
  c.pretrain.learning_rate = 1e-3
  c.pretrain.warmup_steps = 100
  c.pretrain.weight_decay = 0.01
  c.pretrain.template_repeats = 20  # instruction phrasings are few; repeat them in the corpus
  c.pretrain.heldout_share = 0.02  # items whose text is held out to measure the LM loss
  c.pretrain.log_every = 50
  c.pretrain.ckpt_every = 250

  c.ground = ml_collections.ConfigDict()
  c.ground.views = "collaborative,semantic,knowledge"  # knowledge needs timestamps
  c.ground.window = 3  # collaborative view: items within this many steps in a sequence
  c.ground.holiday_days = 14  # knowledge view: the days before a holiday that form its window
  c.ground.out_dim = 64  # E, the grounded embedding size
  c.ground.tau = 0.07
  c.ground.kd_weight = 0.01  # λ_KD; L_KD is a sum over the 2B anchors (DESIGN §1.1)
  c.ground.batch_pairs = 64  # B pairs = 2B items per step
  c.ground.steps = 2000
  c.ground.learning_rate = 1e-3
  c.ground.warmup_steps = 100
  c.ground.weight_decay = 0.01
  c.ground.log_every = 50
  c.ground.eval_every = 250
  c.ground.ckpt_every = 250
  c.ground.encode_batch = 512

  # Task thresholds (sigma_jax/data/tasks.py documents each; its TASK_DEFAULTS, the library's
  # defaults for callers without a config, equal these: tests/unit/test_config_defaults.py).
  c.tasks = ml_collections.ConfigDict()
  c.tasks.longtail_head_share = 0.8  # the head: most popular items covering this share
  c.tasks.holiday_days = 14  # a holiday window: this many days up to the holiday
  c.tasks.query_min_terms = 1  # query terms drawn uniformly in [min, max] ...
  c.tasks.query_max_terms = 3
  # ... each term (from the target's title, categories, tags, brand) kept only while this many
  # items still match, so a query never names its target; a target with no such query is
  # dropped from Query (sft/tasks.json: query.<split>.dropped, matches_median, matches_min).
  c.tasks.query_min_matches = 50
  c.tasks.max_train_per_user = 50  # training examples per user and task; 0: all
  c.tasks.phrasings_seed = 0  # seeds every per-example choice

  c.sft = ml_collections.ConfigDict()
  c.sft.max_len = 128  # prompt tokens; gr_sid (full SIDs in the history) needs more
  c.sft.batch_size = 64
  c.sft.epochs = 1.0  # over all tasks' training examples; ignored when sft.steps > 0
  c.sft.steps = 0
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 100
  c.sft.weight_decay = 0.01
  c.sft.mu = 1.0  # μ, weight of L_ID
  c.sft.tau = 0.07  # InfoNCE temperature of L_ID
  c.sft.hard_negatives = 4  # per query, from the target's prefix bucket
  # L_ID negatives: "batch" (in-batch + hard, DESIGN §1.3) or "catalogue" (all N items).
  c.sft.id_negatives = "batch"
  c.sft.projfuse_hidden = 256
  # How a `<q>` query scores an item key, in L_ID and in retrieval: "cosine" (DESIGN §1.2) or
  # "dot" (unnormalised, so a key's norm can carry an item's overall likelihood).
  c.sft.similarity = "cosine"
  c.sft.tasks = ""  # comma-separated tasks to train on; empty: every task the data allows
  # JustForYou's training layout: "sequence" (one sequence per user, a loss at every history
  # position in one pass; fast), "per_position" (one example per history position, each
  # predicted after the instruction as evaluation does; slower, better: docs/RESULTS.md) or
  # "one_pass" (per_position's examples and per-example loss, batched user by user with each
  # history computed once for all its positions; needs sft.pack).
  c.sft.layout = "sequence"
  c.sft.extra_features = ""  # comma-separated .npy [N, d] matrices for ProjFuse
  # The item text embedding ProjFuse reads beside v_ID: "grounded" (the ground stage's) or "raw"
  # (its un-grounded TF-IDF + PCA embedding: the no-grounding ablation).
  c.sft.text_features = "grounded"
  # Where the SFT backbone starts: "auto" (the behaviour before this option: the pretrain
  # stage's decoder when pretrain.use finds one, otherwise fresh), "pretrain" (the pretrain
  # stage's decoder; an error when that stage has not run), "scratch" (fresh, even after
  # pretrain) or "grounded" (the ground stage's text tower, DESIGN §2: its layers, norms and the
  # SentencePiece rows of the embedding; SID rows, ProjFuse and q_proj start fresh). Chosen on
  # Beauty's validation split (docs/RESULTS.md): grounded .0220 N@10 against .0227 fresh, so
  # the default starts fresh (auto, without a pretrain stage).
  c.sft.init = "auto"
  # Pack several examples to a row (attention kept inside each): the same loss over fewer rows.
  # It changes how fast a step runs, not what it computes, so it is not part of a run's recipe.
  c.sft.pack = True
  c.sft.log_every = 25
  c.sft.ckpt_every = 200

  c.generation = ml_collections.ConfigDict()
  c.generation.mode = "sigma"  # sigma | gr_sid | gr_id
  c.generation.num_beams = 20  # K
  c.generation.top_m = 20  # items kept per prefix bucket
  c.generation.top_n = 20  # N, the recommendation list
  c.generation.fuse = True  # APF; False: the un-fused ranking (ablation)
  c.generation.apf_tau = 0.01  # τ of APF: item logits are cos · σ(φ) / τ
  # > 0: APF with this constant σ for every query instead of the adaptive std(φ) (the
  # sigma_fixed_fusion ablation; only σ/τ matters, so its row sweeps τ at σ = 1). 0: adaptive.
  c.generation.apf_fixed_sigma = 0.0
  # λ of a popularity prior: each item's retrieval score is cos(h, v̂_i) + λ · log(1 + n_i),
  # n_i its training interactions (within its bucket's top M and in APF). 0: none (DESIGN).
  c.generation.item_prior = 0.0
  # How Category and Query constraints act: "hard" (the decoder reaches only the items that
  # satisfy them) or "soft" (the instruction is in the prompt and nothing else restricts
  # decoding: constraint_satisfaction@10 then measures instruction following).
  c.generation.constraints = "hard"
  # "given": the task's instruction in the prompt; "none": no instruction text at all (the
  # no-instruction baseline of soft constraints).
  c.generation.instruction = "given"
  c.generation.eval_batch = 64
  # Evaluation and serving cut a batch's right-padded prompts to its longest prompt, rounded up
  # to a multiple of this (so few shapes compile); 0 keeps them at sft.max_len. Padding is
  # masked and RoPE positions count real tokens, so the ranking is the same either way.
  c.generation.prompt_bucket = 16
  c.generation.eval_tasks = ""  # comma-separated tasks to evaluate; empty: every available
  c.generation.eval_limit = 0  # evaluate at most this many examples per task and split; 0: all
  # Which examples a limit (eval_limit, launch.compare --tau_limit, diagnose/plots --limit)
  # keeps: "first" (file order; the users at the head of Amazon's files are not typical ones) or
  # "random" (a uniform sample without replacement, drawn from eval_sample_seed, the task and the
  # split, so every row and every run of one setting ranks the same examples).
  c.generation.eval_sample = "first"
  c.generation.eval_sample_seed = 0

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "rqkmeans"  # rqkmeans | rqvae
  c.tokenizer.levels = 3
  c.tokenizer.codebook_size = 256
  c.tokenizer.prefix_len = 1
  c.tokenizer.dedup = True
  c.tokenizer.source = "grounded"  # grounded | raw (the no-grounding ablation)
  c.tokenizer.kmeans_iters = 50
  c.tokenizer.kmeans_init = "kmeans++"
  c.tokenizer.rqvae = ml_collections.ConfigDict(dict(
      hidden_dims=(256, 128), latent_dim=32, epochs=100, batch_size=256, learning_rate=1e-3,
      beta=0.25, codebook_init="kmeans", init_scale=1.0, dead_code_threshold=1, reset_every=1))
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config in place to a size for tests and quick CPU runs."""
  c.model = backbone("tiny")
  c.text.vocab_size = 1000
  c.collab.d_model = 32
  c.collab.epochs = 3
  c.collab.batch_size = 64
  c.tokenizer.codebook_size = 16
  c.sft.batch_size = 32
  c.sft.ckpt_every = 50
  c.sft.projfuse_hidden = 64
  c.pretrain.steps = 100
  c.pretrain.batch_size = 32
  c.pretrain.log_every = 25
  c.pretrain.ckpt_every = 50
  c.ground.steps = 200
  c.ground.batch_pairs = 32
  c.ground.eval_every = 50
  c.ground.ckpt_every = 50
  c.ground.log_every = 25
  c.ground.encode_batch = 256
  c.tasks.max_train_per_user = 3
  c.sft.epochs = 2.0
  c.generation.num_beams = 10
  c.generation.eval_batch = 32
  return c


# Variants: `--config=configs/<dataset>.py:<variants>`, comma-separated names applied in order
# to the dataset's config, e.g. `configs/beauty.py:gr_sid` or `configs/demo.py:tiny,gr_id`.
# `tiny` shrinks the config (make_tiny); the others are the rows of `launch.compare`, defined
# here once: each row is the dataset's config with these fields changed, and nothing else.
ROW_VARIANTS = {
    "sigma": {},  # the dataset's config as it is
    # TIGER-style: history and target as full SIDs alone (L tokens an item instead of the
    # prefix's P + 2), no <q> and no L_ID (μ = 0); the decoder excludes history items itself.
    "gr_sid": {"generation.mode": "gr_sid", "sft.max_len": 192, "sft.mu": 0.0},
    "gr_id": {"generation.mode": "gr_id"},
    # SIDs from un-grounded TF-IDF text embeddings.
    # No grounding anywhere: SIDs and ProjFuse read the raw text embedding, SFT starts fresh.
    "sigma_no_grounding": {"tokenizer.source": "raw", "sft.text_features": "raw",
                           "sft.init": "scratch"},
    # sigma's model ranked without APF (launch.compare reuses sigma's SFT for it).
    "sigma_no_apf": {"generation.fuse": False},
    # sigma's model, APF with a constant σ instead of the adaptive one (sigma's SFT reused);
    # launch.compare chooses the constant σ/τ on validation (--fixed_sigma_taus).
    "sigma_fixed_fusion": {"generation.apf_fixed_sigma": 1.0},
    # Soft constraints (sigma's SFT reused): Category and Query instructions in the prompt,
    # nothing restricting decoding; and the same model given no instruction at all.
    "sigma_soft": {"generation.constraints": "soft"},
    "sigma_no_instruction": {"generation.constraints": "soft", "generation.instruction": "none"},
    # The most popular training items (no model): obeying a task's constraint as the decoder
    # does, or ignoring it.
    "popular": {},
    "popular_soft": {"generation.constraints": "soft"},
}
# Recipe variants that are not rows of a comparison: a whole comparison runs under them.
RECIPE_VARIANTS = {
    # Train and evaluate every task the dataset's fields allow (data/tasks.py: available_tasks),
    # not JustForYou alone: on Amazon 2014 Beauty and 2018 Scientific (no timestamps, so no
    # Season or Holiday) JustForYou, Category, Query, Longtail and Discover.
    # Category's instructions (long category paths) reach 132 prompt tokens at history 20.
    "multitask": {"sft.tasks": "", "generation.eval_tasks": "", "sft.max_len": 144},
}
VARIANTS = ("tiny",) + tuple(RECIPE_VARIANTS) + tuple(ROW_VARIANTS)


def variant_names(arg) -> list:
  """'tiny,gr_sid' -> ['tiny', 'gr_sid']; None or '' -> []. ValueError on an unknown name."""
  names = [v.strip() for v in (arg or "").split(",") if v.strip()]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown config variant(s) {', '.join(map(repr, unknown))} in "
                     f"{arg!r}; choose comma-separated names from {', '.join(VARIANTS)}")
  return names


def apply_variant(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Applies the variants named in ``arg`` (see VARIANTS) to ``c`` in place; returns ``c``.

  Variants apply in the order given; two that set the same field: the later one wins.
  """
  for name in variant_names(arg):
    if name == "tiny":
      make_tiny(c)
      continue
    for dotted, value in {**RECIPE_VARIANTS, **ROW_VARIANTS}[name].items():
      node = c
      *parents, leaf = dotted.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c
