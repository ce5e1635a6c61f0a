"""The automatic choices of a run, made on held-out calibration samples before it prunes: the
method (--method auto), the allocation (--allocation auto), the combined estimator's mix
(--mix auto) and the damping (--damp auto). Each compares one-shot trials at the target sparsity
and returns what it chose and why, gathered in `Resolved`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from . import distributed
from .activations import capture_plans
from .allocators import ALLOCATORS, AUTO
from .config import PruneConfig
from .errors import MemoryBudgetError
from .estimators import ESTIMATORS, METHOD_AUTO
from .estimators.base import DAMP_GRID, DEFAULT_DAMP
from .estimators.layerwise import DEFAULT_MIX, MIX_GRID
from .job import (
    Job,
    final_sparsity,
    loss_evaluator,
    make_pruner,
    make_repairer,
    search_split,
    search_statistics,
    statistics_source,
)
from .oneshot import TensorView, plan_statistics
from .progress import Progress
from .repair import repair_settings
from .runtime import memory_budget
from .structure import DEFAULT_STRUCTURE, STRUCTURES

log = logging.getLogger("onnxprune")


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """The run's config with every automatic choice made (method, allocation, mix, damping as
    concrete values), and each search that made one: candidates, held-out losses, choice (None
    where nothing was automatic)."""

    config: PruneConfig
    method: dict | None = None
    allocation: dict | None = None
    mix: dict | None = None
    damp: dict | None = None

    @property
    def searched(self) -> bool:
        """Whether any search actually compared trials (the run then starts from the samples
        its trials pruned with, see `statistics_job`): a damping search stopped after its
        first trial counts, its trial being the run's."""
        return any(
            s is not None and (s.get("searched", True) or bool(s.get("losses")))
            for s in (self.method, self.allocation, self.mix, self.damp)
        )

    @property
    def estimator_searches(self) -> dict[str, dict | None]:
        """The searches reported with the estimator's settings."""
        return {"damp": self.damp, "mix": self.mix}


def resolve(config: PruneConfig, job: Job) -> Resolved:
    """Every automatic choice for this run: the method first (with the allocation, chosen together),
    then the allocation, the mix and the damping under it."""
    config, method_search = resolve_method(config, job)
    resolved = resolve_automatic(config, job)
    return replace(resolved, method=method_search)


def resolve_automatic(config: PruneConfig, job: Job) -> Resolved:
    """The config with `--allocation auto`, `--mix auto` and `--damp auto` resolved. The allocation
    is chosen first (at the default damping and mix while they are automatic), then the mix, then
    the damping under those (each reuses the trial the previous search ran at its default): the
    damping that suits one allocation can be far from the other's best (SparseGPT at 90% on the
    magika file-type model, a TensorFlow export: 1e-4 under global allocation, 1 per layer)."""
    damp_was_auto, mix_was_auto = config.damp == "auto", config.mix == "auto"
    config, allocation_search, losses = resolve_allocation(config, job)
    at_defaults = losses[config.allocation] if losses and damp_was_auto and mix_was_auto else None
    config, mix_search, mix_losses = resolve_mix(config, job, at_defaults)
    known, first = None, None
    if damp_was_auto and (mix_losses or losses):
        known = {DEFAULT_DAMP: mix_losses[float(config.mix)] if mix_losses else losses[config.allocation]}
        first = (allocation_search or mix_search or {}).get("seconds", [None])[0]
    config, damp_search = resolve_damping(config, job, known, first)
    return Resolved(config=config, allocation=allocation_search, mix=mix_search, damp=damp_search)


def statistics_job(config: PruneConfig, job: Job, after_search: bool) -> Job:
    """The job whose calibration samples the run's statistics come from: after an automatic search,
    the samples its trials pruned with, so that the run starts from exactly the trial it chose (on
    other samples, a damping chosen at the edge of stability gave a digits MLP a held-out loss of
    1.99 before the repair where the trial had 0.12); else all of them. The two are the same set
    where the held-out samples are ones the statistics never draw (`job.search_statistics`)."""
    if not after_search or job.calibration is None or len(job.calibration) < 2:
        return job
    return replace(job, calibration=search_statistics(config, job.calibration))


def trials_predict_the_run(config: PruneConfig) -> bool:
    """Whether one-shot trials at the target can choose for this run (method, allocation,
    damping): not for a gradual schedule, whose fine-tuning between steps recovers from what one
    shot cannot, so a trial's winner can lose the run."""
    return config.schedule != "gradual"


def trial_losses(
    config: PruneConfig, job: Job, trials: Sequence[tuple[str, PruneConfig]], seconds: list[float] | None = None
) -> list[float]:
    """For each (label, config): prune once at the config's sparsity with the statistics the run
    would draw (`search_statistics`), repaired as the run would be (the update scaling, mask
    refinement and the weights solve; the statistics correction, rarely kept, is left out), and
    measure the loss on held-out samples (`search_split`); the weights are restored after each
    trial. The repair is part of the trial because it changes which choice is best: on a digits
    MLP at 90% FishLeg's held-out loss was 2.47 per layer and 3.42 global without it, 1.32 and
    0.031 with it; with one round of it in the trials where the run has two, the combined
    estimator's choice on that MLP fell to 0.940 accuracy on one seed (0.975 with the run's own
    two rounds). `seconds` receives each trial's wall time."""
    held = search_split(config, job.calibration_data)[1]
    trial_job = replace(job, calibration=search_statistics(config, job.calibration_data))
    evaluate = loss_evaluator(config, replace(job, calibration=held))
    repair = repair_settings(config, correct_statistics="off")
    saved = {t.name: job.torch_model.tensors[t.name].detach().clone() for t in job.targets}
    losses = []
    for label, trial in trials:
        started = time.perf_counter()
        estimator = ESTIMATORS.get(trial.method)(trial)
        # candidates that differ only in how they threshold the same scores share the statistics
        # (reuse.py) and, with thresholds on whole tensors, what is prepared for their updates; every
        # trial prepares them alike, so that the run a search chooses does not depend on which
        # search's trial it reuses
        thresholds = trial.structure == "unstructured" and trial.pattern is None
        estimator.shared_statistics = config.shared_factors and thresholds
        source = statistics_source(trial, trial_job, estimator)
        with make_pruner(trial, trial_job, estimator, source, Progress(False), reuse="offer") as pruner:
            repairer = make_repairer(config, job, pruner, Progress(False), repair, min_samples=0)
            before = list(pruner.keep)
            try:
                pruner.step(final_sparsity(trial), label, last=True)  # one step to the target
                if repairer is not None:
                    repairer.after_step(label, before)
                losses.append(evaluate())
            finally:
                if repairer is not None:
                    repairer.close()
        with torch.no_grad():
            for name, value in saved.items():
                job.torch_model.tensors[name].copy_(value)
        if seconds is not None:
            seconds.append(round(time.perf_counter() - started, 3))
    return losses


def _choose(what: str, labels: Sequence[str], losses: Sequence[float]) -> int:
    """The index of the smallest loss, logged with every candidate's."""
    best = int(np.argmin(losses))
    listed = ", ".join(f"{label}: {loss:.4g}" for label, loss in zip(labels, losses))
    log.info("%s: chose %s (loss on held-out calibration samples: %s)", what, labels[best], listed)
    return best


def resolve_method(config: PruneConfig, job: Job) -> tuple[PruneConfig, dict | None]:
    """For --method auto: among the methods that fit the model and the memory budget (and
    `auto_methods`), the one whose one-shot pruning at the target leaves the smallest loss on
    held-out calibration samples (statistics from the other samples), each at its default damping
    and, with --allocation auto, with global and per-layer allocation (the pair is chosen
    together). Returns the config with the method (and allocation) and the search: candidates,
    losses, seconds per trial, the methods left out and why, the choice."""
    if config.method != METHOD_AUTO:
        return config, None
    automatic = config.allocation == AUTO and config.pattern is None and trials_predict_the_run(config)
    candidates: list[tuple[str, str | None]] = []
    skipped = {}
    for method in config.auto_methods or ESTIMATORS.names():
        why = does_not_fit(replace(config, method=method), job)
        if why:
            skipped[method] = why
            continue
        for allocation in allocation_candidates(method, config.structure) if automatic else [None]:
            candidates.append((method, allocation))
    labels: list[str] = []
    losses: list[float] = []
    seconds: list[float] = []
    for method, allocation in candidates:
        split = allocation or (config.allocation if config.allocation != AUTO else "global")
        trial = replace(config, method=method, allocation=split, steps=1)
        label = f"{method} ({split})" if allocation else method
        losses.append(trial_losses(config, job, [(label, trial)], seconds)[0])
        labels.append(label)
    best = _choose("method", labels, losses)
    method, allocation = candidates[best]
    search = {
        "candidates": labels,
        "losses": [round(x, 6) for x in losses],
        "seconds": seconds,
        "chosen": labels[best],
        "skipped": skipped,
    }
    return replace(config, method=method, allocation=allocation or config.allocation), search


def does_not_fit(config: PruneConfig, job: Job) -> str | None:
    """Why `config.method` cannot prune the job's targets (None when it can)."""
    estimator = ESTIMATORS.get(config.method)(config)
    if estimator.needs_activations:
        _, refused = capture_plans(job.torch_model, job.targets)
        if refused:
            return f"cannot read the inputs of {len(refused)} weight(s)"
    if estimator.needs_gradients:
        views = [TensorView(t, job.torch_model.tensors[t.name]) for t in job.targets]
        try:
            plan_statistics(views, estimator, config.num_grads, memory_budget(config), 0)
        except MemoryBudgetError:
            return "its statistics do not fit --max-memory"
    return None


def _search_allocation(config: PruneConfig) -> str:
    """The allocation the damping and mix searches prune with: auto and those that measure the
    model (sensitivity) are searched under global allocation, which is also auto's first candidate."""
    if config.allocation == AUTO or ALLOCATORS.get(config.allocation).needs_evaluation:
        return "global"
    return config.allocation


def resolve_damping(
    config: PruneConfig, job: Job, known: dict[float, float] | None = None, first_seconds: float | None = None
) -> tuple[PruneConfig, dict | None]:
    """The config with `damp` a number: as given, or for "auto" the grid value whose one-shot
    pruning at the target sparsity leaves the smallest loss on held-out calibration samples, under
    the config's allocation (global for sensitivity). `known` holds losses already measured for
    some grid values, `first_seconds` how long the first of those trials took. Each value costs a
    trial with its own statistics, as long as the first (at the default damping, which the run
    takes over when nothing else is tried): the rest of the grid is tried only when that is
    expected to take at most `damp_search_seconds` (a measured cost, not a model size: MiniLM's
    10.6M weights take about 80 s a trial on 2 CPU cores). Returns the search too: grid, losses,
    choice, and why it stopped early."""
    estimator = ESTIMATORS.get(config.method)
    if config.damp != "auto" or not estimator.uses_damping:
        return config, None
    if not trials_predict_the_run(config):
        # the trials chose 1e-4 on a digits MLP, whose gradual run then kept 0.87 against 0.95 at 1e-3
        why = "gradual schedule, one-shot trials do not predict it"
        log.info("damping: %s; using %g (pass --damp to choose)", why, DEFAULT_DAMP)
        return replace(config, damp=DEFAULT_DAMP), {
            "grid": [], "losses": [], "chosen": DEFAULT_DAMP, "searched": False, "why": why,
        }  # fmt: skip
    allocation = _search_allocation(config)
    known = dict(known or {})
    if DEFAULT_DAMP not in known or first_seconds is None:
        seconds: list[float] = []
        trial = replace(config, damp=DEFAULT_DAMP, steps=1, allocation=allocation)
        known[DEFAULT_DAMP] = trial_losses(config, job, [(f"damping {DEFAULT_DAMP:g}", trial)], seconds)[0]
        first_seconds = seconds[0]
    todo = [d for d in DAMP_GRID if d not in known]
    # every rank decides as rank 0 measured, so that all prune with the same damping
    estimate = distributed.from_writer(len(todo) * first_seconds)
    if estimate > config.damp_search_seconds:
        why = (
            f"the other {len(todo)} grid values would take about {estimate:.0f} s (a trial each, as long as the "
            f"first: {first_seconds:.0f} s), more than --damp-search-seconds {config.damp_search_seconds:g}"
        )
        log.info("damping: %s; using %g (pass --damp, or a larger --damp-search-seconds)", why, DEFAULT_DAMP)
        search = {"grid": [DEFAULT_DAMP], "losses": [round(known[DEFAULT_DAMP], 6)], "chosen": DEFAULT_DAMP}
        return replace(config, damp=DEFAULT_DAMP), {
            **search, "searched": False, "why": why, "estimated_seconds": round(estimate, 1), "allocation": allocation,
        }  # fmt: skip
    trials = [(f"damping {d:g}", replace(config, damp=d, steps=1, allocation=allocation)) for d in todo]
    known.update(zip(todo, trial_losses(config, job, trials)))
    losses = [known[d] for d in DAMP_GRID]
    chosen = DAMP_GRID[_choose("damping", [f"{d:g}" for d in DAMP_GRID], losses)]
    search = {
        "grid": list(DAMP_GRID),
        "losses": [round(x, 6) for x in losses],
        "chosen": chosen,
        "searched": True,
        "allocation": allocation,
    }
    return replace(config, damp=chosen), search


def allocation_candidates(method: str, structure: str = DEFAULT_STRUCTURE) -> list[str]:
    """What --allocation auto compares for `method` (magnitude's own profile is its global split)
    under `structure` (whole channels: the allocations it supports)."""
    supported = STRUCTURES.get(structure).allocations
    candidates = [name for name in ALLOCATORS if ALLOCATORS.get(name).auto_candidate]
    candidates = [a for a in candidates if supported is None or a in supported]
    return [a for a in candidates if not (a == "magnitude" and method == "magnitude")]


def _no_allocation_search(config: PruneConfig, job: Job) -> str | None:
    """Why --allocation auto is global without trials (None: the trials run)."""
    if config.pattern:
        return "the N:M pattern fixes each tensor's sparsity"
    if config.target_speedup is not None:
        return "--target-speedup chooses each layer's width from the measured latency table"
    if not trials_predict_the_run(config):
        # a one-shot trial at the target says nothing of a gradual run, whose fine-tuning between
        # steps recovers from what one shot cannot (a digits CNN at 95%, 8 steps, 300 fine-tuning
        # steps: global 0.980 / 0.990 / 0.985 for magnitude / FishLeg / WoodFisher, per layer
        # 0.914 / 0.801 / 0.856, yet one shot per layer looked better)
        return "gradual schedule: one-shot trials do not predict it"
    if job.calibration is None or len(job.calibration) < 2:
        return "no calibration data to compare on"
    return None


def resolve_allocation(config: PruneConfig, job: Job) -> tuple[PruneConfig, dict | None, dict[str, float]]:
    """The config with a concrete allocation: as given, or for "auto" the candidate (global, per
    layer, or the magnitude profile) whose one-shot pruning at the target sparsity leaves the
    smallest loss on held-out calibration samples (at the given damping, DEFAULT_DAMP while it is
    "auto"). None wins everywhere: on the MNIST CNN global keeps SparseGPT at 0.95 where per layer
    drops it to 0.57 (90%); on MiniLM it is the other way round (0.40 vs 0.76 at 70%). Returns the
    search (candidates, losses, choice) for the report and the losses unrounded."""
    if config.allocation != AUTO:
        return config, None, {}
    why = _no_allocation_search(config, job)
    if why is not None:
        log.info("allocation: global (%s)", why)
        return replace(config, allocation="global"), None, {}
    candidates = allocation_candidates(config.method, config.structure)
    trials = [(f"allocation {a}", replace(config, steps=1, allocation=a)) for a in candidates]
    seconds: list[float] = []
    losses = dict(zip(candidates, trial_losses(config, job, trials, seconds)))
    chosen = candidates[_choose("allocation", candidates, [losses[a] for a in candidates])]
    search = {
        "candidates": candidates,
        "losses": [round(losses[a], 6) for a in candidates],
        "seconds": seconds,  # the first trial's include the statistics the others share
        "chosen": chosen,
    }
    return replace(config, allocation=chosen), search, losses


def resolve_mix(
    config: PruneConfig, job: Job, at_default: float | None
) -> tuple[PruneConfig, dict | None, dict[float, float]]:
    """For the combined estimator with `mix` "auto": the weight of the task-loss term from
    MIX_GRID whose one-shot pruning leaves the smallest held-out loss (at DEFAULT_DAMP while the
    damping is automatic; `at_default` is the loss already measured at DEFAULT_MIX)."""
    if config.mix != "auto" or not ESTIMATORS.get(config.method).needs_output_gradients:
        return config, None, {}
    known = {DEFAULT_MIX: at_default} if at_default is not None else {}
    todo = [a for a in MIX_GRID if a not in known]
    trials = [(f"mix {a:g}", replace(config, mix=a, steps=1, allocation=_search_allocation(config))) for a in todo]
    seconds: list[float] = []
    known.update(zip(todo, trial_losses(config, job, trials, seconds)))
    losses = [known[a] for a in MIX_GRID]
    chosen = MIX_GRID[_choose("mix", [f"{a:g}" for a in MIX_GRID], losses)]
    search = {"grid": list(MIX_GRID), "losses": [round(x, 6) for x in losses], "seconds": seconds, "chosen": chosen}
    return replace(config, mix=chosen), search, known
