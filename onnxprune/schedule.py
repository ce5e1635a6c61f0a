"""Sparsity schedules: pure functions of the step."""

from __future__ import annotations


def cubic(step: int, steps: int, initial: float, final: float) -> float:
    """s_t = s_f − (s_f − s_0)(1 − t/T)³: prunes fast while much redundancy is left, slowly near
    the target (Zhu & Gupta's schedule)."""
    if steps <= 0:
        return final
    t = min(max(step, 0), steps)
    return final - (final - initial) * (1.0 - t / steps) ** 3


def oneshot_targets(final: float, steps: int) -> list[float]:
    """Sparsity after each of `steps` recomputation steps of a one-shot run (the last is `final`)."""
    return [cubic(t, steps, 0.0, final) for t in range(1, steps + 1)]
