"""Learning-rate, sparsity-coefficient and Lp-exponent schedules: pure functions of the step."""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup_steps: int, decay_start: float) -> float:
    """Linear warmup over ``warmup_steps``, constant, then linear decay to 0 from ``decay_start * total``."""
    f = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        f = (step + 1) / warmup_steps
    start = int(decay_start * total)
    if decay_start < 1.0 and step >= start:
        f *= max(0.0, (total - step) / max(1, total - start))
    return f


def sparsity_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear ramp of the sparsity coefficient from 0 to 1 over the first ``warmup_frac`` of training."""
    n = int(warmup_frac * total)
    if n <= 0:
        return 1.0
    return min(1.0, (step + 1) / n)


def p_value(step: int, total: int, p_start: float, p_end: float, anneal_start: float) -> float:
    """p-annealing: ``p_start`` until ``anneal_start * total``, then linear to ``p_end`` at the end."""
    if p_start == p_end:
        return p_start
    s = int(anneal_start * total)
    if step < s:
        return p_start
    t = (step - s) / max(1, total - 1 - s)
    return p_start + (p_end - p_start) * min(1.0, t)
