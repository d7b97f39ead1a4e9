"""The optimizer every backbone stage uses: clipped AdamW with warmup and cosine decay."""
from __future__ import annotations

import optax


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float, clip_norm: float = 1.0):
  """Returns (tx, schedule). Warmup is capped at half the run so short runs still decay."""
  total = max(1, int(total_steps))
  warmup = min(int(warmup_steps), total // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, float(learning_rate), warmup, total,
                                                float(learning_rate) * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                   optax.adamw(schedule, weight_decay=float(weight_decay)))
  return tx, schedule
