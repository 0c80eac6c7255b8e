"""Learning-rate schedules as pure functions of the step: nothing to checkpoint, nothing to drift."""
from __future__ import annotations

import math

from .config import Recipe


def lr_at(step: int, recipe: Recipe) -> float:
    """LR for optimizer step ``step`` (0-based) of this phase."""
    s, opt, total = recipe.schedule, recipe.optimizer, recipe.train.steps
    peak, floor = opt.lr, opt.min_lr
    if s.warmup_steps and step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return peak
    if s.kind == "cosine":
        span = max(total - s.warmup_steps, 1)
        progress = min((step - s.warmup_steps) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: stable until the last decay_steps steps, then decay to floor at the final step
    decay_start = total - s.decay_steps
    if step < decay_start or s.decay_steps == 0:
        return peak
    progress = min((step - decay_start + 1) / s.decay_steps, 1.0)
    if s.decay_shape == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak + (floor - peak) * progress
