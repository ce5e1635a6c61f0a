"""Sparsity schedules: pure functions of the step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .registry import Registry


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


@dataclass(frozen=True)
class Phase:
    """One pruning step to `sparsity`, then `finetune_steps` optimiser steps with masks fixed."""

    sparsity: float
    finetune_steps: int
    label: str
    last: bool = False  # the schedule's final step (where an N:M pattern is complete)


Schedule = Callable[..., list[Phase]]
SCHEDULES: Registry[Schedule] = Registry("schedule")


def _split(total: int, parts: int) -> list[int]:
    """`total` fine-tuning steps over `parts` intervals, the remainder to the last ones."""
    base, extra = divmod(total, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


@SCHEDULES.register("oneshot")
def oneshot(final: float, steps: int, initial: float, finetune_steps: int) -> list[Phase]:
    """Reach `final` in `steps` recomputation steps with no training between them, then spend
    the whole fine-tuning budget at the end."""
    targets = oneshot_targets(final, steps)
    return [
        Phase(s, finetune_steps if t == steps else 0, f"step {t}/{steps}", last=t == steps)
        for t, s in enumerate(targets, 1)
    ]


@SCHEDULES.register("gradual")
def gradual(final: float, steps: int, initial: float, finetune_steps: int) -> list[Phase]:
    """Cubic schedule from `initial` to `final` over `steps` pruning steps, the fine-tuning budget
    split evenly between them (the last share recovers at the final sparsity)."""
    budget = _split(finetune_steps, steps)
    return [
        Phase(cubic(t, steps, initial, final), budget[t - 1], f"step {t}/{steps}", last=t == steps)
        for t in range(1, steps + 1)
    ]
