"""The `onnxprune` command: options → PruneConfig → prune() → report. No logic of its own."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from onnxprune.allocators import CHOICES as ALLOCATIONS
from onnxprune.augment import AUGMENTATIONS
from onnxprune.config import DEVICES, FISHLEG_INITS, OBS_UPDATES, PROGRESS, SEARCH_HOLDOUTS, PruneConfig
from onnxprune.estimators import DEFAULT_METHOD, ESTIMATORS, METHOD_AUTO
from onnxprune.finetune import BATCHNORM_MODES, OPTIMIZERS
from onnxprune.gradients import FISHER_KINDS
from onnxprune.repair import STATISTICS_MODES
from onnxprune.schedule import SCHEDULES
from onnxprune.structure import DEFAULT_STRUCTURE, STRUCTURES
from onnxprune.validate import METRICS

EXIT_CODES = """\b
Exit codes:
  0  ok
  1  internal error (a bug: please report it)
  2  usage error (bad option, output exists without --force, ...)
  3  invalid or unsafe model
  4  unsupported operator
  5  bad calibration or evaluation data
  6  accuracy gate failed (--max-drop); output and report are written
  7  non-finite weights, gradients, scores or model outputs; nothing is written
  8  the Fisher statistics would exceed --max-memory; nothing is written
  9  a file could not be written (disk full, permissions); no partial file is left
  10 the model with channels removed computes something else or fails to run (--structure);
     nothing is written
  11 --target-speedup cannot be reached (measured); nothing is written
"""


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _default(field: str):
    """The library's default for a setting, so the CLI never disagrees with it."""
    return PruneConfig.__dataclass_fields__[field].default


def _sparsity(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value < 1.0:
        raise click.BadParameter(f"{value} is not in [0, 1)")
    return value


def _max_drop(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is not in [0, 1]")
    return value


class _NumberOrAuto(click.ParamType):
    """A float that passes `valid` (else the message names `requirement`), or the word 'auto'."""

    def __init__(self, name: str, valid, requirement: str):
        self.name, self.valid, self.requirement = name, valid, requirement

    def convert(self, value, param, ctx):
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)
        if not self.valid(number):
            self.fail(f"{value} is {self.requirement}", param, ctx)
        return number


_DAMP = _NumberOrAuto("DAMP|auto", lambda x: x > 0, "not positive")
_MIX = _NumberOrAuto("ALPHA|auto", lambda x: 0.0 <= x <= 1.0, "not in [0, 1]")


_SHARED = [
    click.option(
        "--structure",
        type=click.Choice(STRUCTURES.names()),
        default=DEFAULT_STRUCTURE,
        show_default=True,
        help="What is removed. unstructured: single weights set to zero (same shapes: smaller once compressed, "
        "not faster in onnxruntime); channels: whole output channels of Conv/Gemm/MatMul layers (and FFN "
        "neurons) with every row, column, bias and per-channel constant they touch, found through the graph "
        "(residual Adds tie channels, Concat offsets them, depthwise convolutions carry them) and whole attention "
        "heads: the written model is smaller and faster; heads: attention heads only; ffn: channels without the "
        "heads. With channels, heads or ffn --sparsity is the fraction of the removable parameters removed "
        "and --allocation is global, layer or auto; the report lists what could not be traced.",
    ),
    click.option(
        "--speed-runs",
        type=click.IntRange(min=0),
        default=20,
        show_default=True,
        help="Timed onnxruntime runs of the original and the output for the report's speed section, after "
        "warm-up (0: sizes, parameters and FLOPs only).",
    ),
    click.option(
        "--speed-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per timed run."
    ),
    click.option(
        "--speed-threads",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="onnxruntime intra-op threads for the timed runs (0: every core this process may use).",
    ),
    click.option(
        "--allocation",
        "--scope",
        "allocation",
        type=click.Choice([*ALLOCATIONS, "uniform"]),
        default="auto",
        show_default=True,
        help="How the sparsity is split across tensors. global: one threshold over all weights on the "
        "estimator's scale; layer (or uniform): every tensor to the same sparsity; magnitude: each tensor to "
        "the sparsity global magnitude pruning gives it, the entries chosen by the estimator; sensitivity: "
        "per-tensor sparsities that minimise the measured loss increase (each tensor pruned alone at several "
        "sparsities, the model run on calibration samples); auto: global, layer or magnitude, whichever "
        "leaves the smallest loss on held-out calibration samples (global without calibration data, with "
        "--pattern and with --schedule gradual).",
    ),
    click.option(
        "--damp-search-seconds",
        type=click.FloatRange(min=0),
        default=_default("damp_search_seconds"),
        show_default=True,
        metavar="S",
        help="--damp auto tries its whole grid (six trials) only when the five after the first are expected to "
        "take at most S seconds (each as long as the first, measured); else it keeps the default damping, "
        "and the report says why. 0: never search.",
    ),
    click.option(
        "--search-holdout",
        type=click.Choice(SEARCH_HOLDOUTS),
        default=_default("search_holdout"),
        show_default=True,
        help="Where the automatic searches (--allocation/--damp/--mix/--method auto) measure their held-out "
        "losses. quarter: on a random quarter of --calib, the statistics drawn from the rest; unused: on "
        "calibration samples the statistics never draw, so each trial prunes with the run's own statistics "
        "(when --calib has room for both; else as quarter).",
    ),
    click.option(
        "--pattern",
        metavar="N:M",
        help="N:M sparsity, e.g. 2:4: at most N non-zeros in every M consecutive inputs of an output unit "
        "(across input channels for convolutions), as sparse tensor cores expect; needs --sparsity 1-N/M.",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Leave dense the weights whose tensor name or consumer node name matches (repeatable).",
    ),
    click.option(
        "--calib",
        type=click.Path(exists=True, path_type=Path),
        help="Calibration data: a .npz keyed by input name (+ optional 'labels'), or a folder of them.",
    ),
    click.option(
        "--eval",
        "evaluation",
        type=click.Path(exists=True, path_type=Path),
        help="Evaluation data, same format. Default: a held-out quarter of --calib.",
    ),
    click.option(
        "--metric",
        type=click.Choice(METRICS),
        default="auto",
        show_default=True,
        help="Headline and gate metric. auto: accuracy with labels, else top-1 agreement for a classifier "
        "output, else cosine similarity of the first output.",
    ),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for data splits and synthesis."),
    click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="Where torch computes; cuda without a usable GPU is an error.",
    ),
    click.option(
        "--steps",
        type=click.IntRange(min=1),
        default=_default("steps"),
        show_default=True,
        help="Recomputation steps: reach the sparsity in this many steps, fresh gradients each time.",
    ),
    click.option(
        "--num-grads",
        type=click.IntRange(min=1),
        default=_default("num_grads"),
        show_default=True,
        help="Gradients per Fisher estimate (second-order methods).",
    ),
    click.option(
        "--fisher-batch",
        type=click.IntRange(min=1),
        default=_default("fisher_batch"),
        show_default=True,
        help="Samples averaged into each gradient (1: per-sample gradients).",
    ),
    click.option(
        "--fisher",
        type=click.Choice(FISHER_KINDS),
        default=_default("fisher"),
        show_default=True,
        help="empirical: gradients at the calibration labels; true: at labels sampled from the model; "
        "auto: empirical when labels fit the output.",
    ),
    click.option(
        "--block-size",
        type=click.IntRange(min=1),
        default=_default("block_size"),
        show_default=True,
        help="WoodFisher block of consecutive weights of one output unit; memory grows with it.",
    ),
    click.option(
        "--damp",
        type=_DAMP,
        default=_default("damp"),
        show_default=True,
        help="Relative damping: lambda = DAMP x mean(diag F) (or of diag H for sparsegpt), per tensor; "
        "auto: chosen per model from 1e-4..10 on held-out calibration samples, where the search fits "
        "--damp-search-seconds (else, and for gradual schedules, 1e-3).",
    ),
    click.option(
        "--mix",
        type=_MIX,
        default=_default("mix"),
        show_default=True,
        help="combined: weight of the task-loss Fisher against each layer's reconstruction error, in [0, 1] "
        "(0: SparseGPT); auto: chosen from 0, 0.5, 1 on held-out calibration samples.",
    ),
    click.option(
        "--obs-update",
        type=click.Choice(OBS_UPDATES),
        default=_default("obs_update"),
        show_default=True,
        help="How WoodFisher compensates: joint (exact per block), summed (original paper), none.",
    ),
    click.option(
        "--schedule",
        type=click.Choice(SCHEDULES.names()),
        default=_default("schedule"),
        show_default=True,
        help="oneshot: reach the sparsity in --steps steps, then fine-tune; gradual: --prune-steps steps of "
        "the cubic schedule with fine-tuning between them.",
    ),
    click.option(
        "--prune-steps",
        type=click.IntRange(min=1),
        default=_default("prune_steps"),
        show_default=True,
        help="Pruning steps of the gradual schedule.",
    ),
    click.option(
        "--initial-sparsity",
        type=click.FloatRange(min=0, max=1, max_open=True),
        default=_default("initial_sparsity"),
        show_default=True,
        help="Where the gradual schedule starts.",
    ),
    click.option(
        "--finetune-steps",
        type=click.IntRange(min=0),
        default=_default("finetune_steps"),
        show_default=True,
        help="Total optimiser steps of fine-tuning with the masks fixed (0: none); gradual runs split them "
        "between pruning steps.",
    ),
    click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        default=_default("lr"),
        show_default=True,
        help="Fine-tuning learning rate.",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=_default("batch_size"),
        show_default=True,
        help="Fine-tuning mini-batch.",
    ),
    click.option(
        "--optimizer",
        type=click.Choice(OPTIMIZERS.names()),
        default=_default("optimizer"),
        show_default=True,
    ),
    click.option(
        "--temperature",
        type=click.FloatRange(min=0, min_open=True),
        default=_default("temperature"),
        show_default=True,
        help="Distillation temperature for class scores (fine-tuning without labels).",
    ),
    click.option(
        "--augment",
        type=click.Choice(AUGMENTATIONS.names()),
        default=_default("augment"),
        show_default=True,
        help="Distillation batches perturbed at each step, the original model run on them for the "
        "targets: tokens replaces --augment-rate of the token ids (special tokens and padding kept); "
        "auto does so where the model takes token ids; none trains on the calibration samples as they are.",
    ),
    click.option(
        "--augment-rate",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=_default("augment_rate"),
        show_default=True,
        help="Share of the token ids --augment replaces in each batch.",
    ),
    click.option(
        "--batchnorm",
        type=click.Choice(BATCHNORM_MODES),
        default=_default("batchnorm"),
        show_default=True,
        help="frozen: keep BatchNorm running statistics; reestimate: recompute them on the calibration "
        "data after each pruning step and write them back.",
    ),
    click.option(
        "--shared-factors/--no-shared-factors",
        default=_default("shared_factors"),
        show_default=True,
        help="The allocation search's candidates take their WoodFisher joint updates from one Cholesky "
        "factor per block, in saliency order (each candidate's pruned set is a prefix of it); "
        "--no-shared-factors factors each candidate's set again (equal to float rounding, slower).",
    ),
    click.option(
        "--scale-update/--no-scale-update",
        default=_default("scale_update"),
        show_default=True,
        help="After each pruning step of an estimator that updates the surviving weights at once "
        "(woodfisher, fishleg), scale that update by 0, 0.25, 0.5, 0.75 or 1, whichever leaves the "
        "smallest loss on held-out calibration samples (not under --schedule gradual).",
    ),
    click.option(
        "--refine-masks/--no-refine-masks",
        default=_default("refine_masks"),
        show_default=True,
        help="After each pruning step, swap pruned and kept weights within a row where that lowers the "
        "layer's reconstruction error on calibration inputs (kept only if the held-out loss drops).",
    ),
    click.option(
        "--solve-weights/--no-solve-weights",
        default=_default("solve_weights"),
        show_default=True,
        help="After each pruning step, set each layer's surviving weights to the least-squares solution for "
        "its mask on calibration inputs from the already-repaired layers (kept only if the held-out loss drops).",
    ),
    click.option(
        "--correct-statistics",
        type=click.Choice(STATISTICS_MODES),
        default=_default("correct_statistics"),
        show_default=True,
        help="After each pruning step, match each layer's output mean (variance: and variance; auto: variance "
        "where a normalisation reads it) to the dense model's, folded into its bias (kept only if the "
        "held-out loss drops).",
    ),
    click.option(
        "--repair-samples",
        type=click.IntRange(min=1),
        default=_default("repair_samples"),
        show_default=True,
        help="Calibration samples the repairs are computed on.",
    ),
    click.option(
        "--relevant-rows/--all-rows",
        default=_default("relevant_rows"),
        show_default=True,
        help="Layer-wise statistics and repairs leave out the input rows the outputs never read (padding "
        "tokens behind an attention mask, found from exact zeros of an output gradient); --all-rows keeps them.",
    ),
    click.option(
        "--repair-rounds",
        type=click.IntRange(min=1),
        default=_default("repair_rounds"),
        show_default=True,
        help="How many times the mask refinement and the weights solve alternate after each step.",
    ),
    click.option(
        "--fishleg-steps",
        type=click.IntRange(min=0),
        default=_default("fishleg_steps"),
        show_default=True,
        help="FishLeg: auxiliary-loss Adam steps at the first pruning step.",
    ),
    click.option(
        "--fishleg-online-steps",
        type=click.IntRange(min=0),
        default=_default("fishleg_online_steps"),
        show_default=True,
        help="FishLeg: auxiliary steps at each later pruning step (the online update).",
    ),
    click.option(
        "--fishleg-lr",
        type=click.FloatRange(min=0, min_open=True),
        default=_default("fishleg_lr"),
        show_default=True,
        help="FishLeg: Adam learning rate on the auxiliary loss (cosine-decayed within each update).",
    ),
    click.option(
        "--fishleg-probes",
        type=click.IntRange(min=1),
        default=_default("fishleg_probes"),
        show_default=True,
        help="FishLeg: Gaussian probe vectors per auxiliary step.",
    ),
    click.option(
        "--fishleg-init",
        type=click.Choice(FISHLEG_INITS),
        default=_default("fishleg_init"),
        show_default=True,
        help="FishLeg: warm start of Q: kfac (Kronecker factors of the gradients) or diagonal (diagonal Fisher).",
    ),
    click.option(
        "--fishleg-damp",
        type=click.FloatRange(min=0, min_open=True),
        default=_default("fishleg_damp"),
        show_default=True,
        help="FishLeg: relative damping gamma = FISHLEG_DAMP x mean(diag F), per tensor.",
    ),
    click.option(
        "--fishleg-block",
        type=click.IntRange(min=1),
        default=_default("fishleg_block"),
        show_default=True,
        help="FishLeg: largest Kronecker factor; bigger layers get block-diagonal factors.",
    ),
    click.option(
        "--max-memory",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="GIB",
        help=(
            "Memory for the Fisher statistics of each process, in GiB; more is refused (exit 8). Default: 80% of "
            "available, shared by the torchrun ranks of a machine."
        ),
    ),
    click.option(
        "--progress",
        type=click.Choice(PROGRESS),
        default="auto",
        show_default=True,
        help="Progress on stderr; auto: on a terminal and not under CI.",
    ),
]


def shared_options(command):
    """The options `prune` and `sweep` both take: data, metric, device, estimator, schedule and
    fine-tuning settings, resources."""
    for option in reversed(_SHARED):
        command = option(command)
    return command


class _PruneByDefault(click.Group):
    """`onnxprune IN OUT ...` means `onnxprune prune IN OUT ...`; `onnxprune sweep ...` sweeps."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


def _show_versions(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from onnxprune.environment import environment, format_versions

    with _stdout_to_stderr():
        text = format_versions(environment())
    click.echo(text)
    ctx.exit(0)


@click.group(
    cls=_PruneByDefault,
    context_settings=CONTEXT,
    epilog="Run `onnxprune prune --help` or `onnxprune sweep --help` for their options and exit codes.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_versions,
    help="Show the versions of onnxprune, torch, onnx, onnxruntime (and its providers), and exit.",
)
def main() -> None:
    """Prune ONNX models with second-order estimators and validate them in onnxruntime.

    \b
      onnxprune IN.onnx OUT.onnx --sparsity 0.8 --calib data.npz    (same as `onnxprune prune ...`)
      onnxprune sweep IN.onnx --sparsity 0.5,0.7,0.9 --method magnitude,woodfisher --calib data.npz
    """


@main.command("prune", context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("input_path", metavar="IN.onnx", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("output_path", metavar="OUT.onnx", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--sparsity",
    type=float,
    callback=_sparsity,
    help="Fraction of the prunable weights to zero, in [0, 1) (or --target-speedup with --structure channels).",
)
@click.option(
    "--target-speedup",
    type=float,
    help="With --structure channels (or heads, ffn), instead of --sparsity: remove channels until the output "
    "is measured this many times faster in onnxruntime (--speed-batch, --speed-threads). A latency table of the "
    "removable channels is timed first, each group's widths are scored on held-out calibration samples, and the "
    "widths with the smallest summed loss increase for the speed are kept; a target that removing every "
    "removable channel does not reach stops "
    "with exit 11 before any pruning.",
)
@click.option(
    "--method",
    type=click.Choice((*ESTIMATORS.names(), METHOD_AUTO)),
    default=DEFAULT_METHOD,
    show_default=True,
    help="Estimator deciding which weights to drop; auto: each one that fits prunes on three quarters of the "
    "calibration samples and the one with the smallest loss on the rest is used.",
)
@click.option(
    "--auto-methods",
    default="",
    callback=lambda ctx, param, value: tuple(m for m in value.split(",") if m),
    help="With --method auto: comma-separated estimators to choose from (default: all that fit).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the JSON report. Default: OUT.report.json next to the output.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (and nothing else there).")
@click.option(
    "--max-drop",
    type=float,
    callback=_max_drop,
    help="Fail with exit 6 if accuracy (or top-1 agreement, or output cosine) drops by more than this.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Checkpoint written after each step of a multi-step run. Default: OUT.onnx.ckpt; removed on success.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option(
    "--html",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the report as one self-contained HTML page (figures embedded).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Load and check the model and data, print what would be pruned and the memory estimate; write nothing.",
)
@shared_options
@click.option("--force", is_flag=True, help="Overwrite an existing output and report.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings on stderr; no table.")
@click.option("-v", "--verbose", is_flag=True, help="Log details of each stage on stderr.")
@click.option("--debug", is_flag=True, help="Show the traceback of internal errors.")
def prune_command(
    input_path: Path,
    output_path: Path,
    calib: Path | None,
    as_json: bool,
    dry_run: bool,
    quiet: bool,
    verbose: bool,
    debug: bool,
    **settings,
) -> None:
    """Prune IN.onnx into OUT.onnx and validate it with onnxruntime.

    The output keeps the input's graph, node and tensor names, opsets and IR version; only the
    pruned weight tensors change. A JSON report is written next to the output and a short table
    is printed on stderr.
    """
    from onnxprune.distributed import launched_as_writer

    if not launched_as_writer():  # torchrun's other ranks: rank 0 alone speaks
        quiet, as_json = True, False
    _configure_logging(quiet, verbose)
    from onnxprune import PruneConfig, plan, prune
    from onnxprune.dryrun import format_dry_run
    from onnxprune.report import format_human

    def work():
        from onnxprune.errors import UsageError

        if settings["sparsity"] is None:
            if settings["target_speedup"] is None:
                raise UsageError(
                    "pass --sparsity (the fraction of weights to prune) or, with --structure channels, --target-speedup"
                )
            settings["sparsity"] = 0.0
        config = PruneConfig(input=input_path, output=output_path, calibration=calib, **settings)
        return plan(config) if dry_run else prune(config)

    result = _run(work, debug)
    if not quiet:
        click.echo((format_dry_run if dry_run else format_human)(result), err=True)
    if as_json:
        click.echo(result.to_json(), nl=False)
    sys.exit(result.exit_code)


def _float_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise click.BadParameter(f"{value!r}: give one or more sparsities in [0, 1), separated by commas")
    return values


def _method_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    methods = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [m for m in methods if m not in ESTIMATORS]
    if not methods or unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(ESTIMATORS.names())}")
    return methods


@main.command("sweep", context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("input_path", metavar="IN.onnx", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--sparsity",
    "sparsities",
    default="0.5,0.7,0.8,0.9",
    show_default=True,
    callback=_float_list,
    help="Comma-separated sparsities.",
)
@click.option(
    "--method",
    "methods",
    default=f"magnitude,{DEFAULT_METHOD}",
    show_default=True,
    callback=_method_list,
    help=f"Comma-separated methods: {', '.join(ESTIMATORS.names())}.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Folder and name stem of what is written: OUT.sweep.json, OUT.sweep.png (and OUT.METHOD.SPARSITY.onnx "
    "with --keep-models). Default: the input's name in the current folder.",
)
@click.option("--keep-models", is_flag=True, help="Keep every pruned model of the grid.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep's JSON report on stdout (and nothing else).")
@shared_options
@click.option("--force", is_flag=True, help="Overwrite the sweep's existing files.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings on stderr; no table.")
@click.option("-v", "--verbose", is_flag=True, help="Log details of each stage on stderr.")
@click.option("--debug", is_flag=True, help="Show the traceback of internal errors.")
def sweep_command(
    input_path: Path,
    sparsities: tuple[float, ...],
    methods: tuple[str, ...],
    out: Path | None,
    keep_models: bool,
    calib: Path | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    debug: bool,
    **settings,
) -> None:
    """Accuracy (or agreement, or cosine) against sparsity for each method: one table, one plot.

    For one-shot single-step runs without fine-tuning, each method's gradients and statistics
    are computed once and reused for every sparsity.
    """
    _configure_logging(quiet, verbose)
    from onnxprune import PruneConfig
    from onnxprune.sweeps import SweepConfig, format_sweep, sweep

    def work():
        stem = out if out is not None else Path(input_path.stem)
        base = PruneConfig(
            input=input_path,
            output=stem.with_name(stem.name + ".onnx"),
            sparsity=max(sparsities),
            method=methods[0],
            calibration=calib,
            **settings,
        )
        return sweep(SweepConfig(settings=base, sparsities=sparsities, methods=methods, keep_models=keep_models))

    result = _run(work, debug)
    if not quiet:
        click.echo(format_sweep(result), err=True)
    if as_json:
        click.echo(result.to_json(), nl=False)
    sys.exit(0)


def _run(work, debug: bool):
    """Run the library call with stdout kept for JSON; errors become one line and an exit code."""
    from onnxprune.errors import OnnxPruneError

    try:
        with _stdout_to_stderr():
            return work()
    except OnnxPruneError as exc:
        click.echo(f"onnxprune: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("onnxprune: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        click.echo(f"onnxprune: internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("onnxprune: this is a bug; rerun with --debug and report the traceback", err=True)
        sys.exit(1)


def _configure_logging(quiet: bool, verbose: bool = False) -> None:
    logger = logging.getLogger("onnxprune")
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnxprune: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (by us or by libraries, Python or C) to stderr, so that
    stdout carries only the JSON report."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    python_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = python_stdout
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


if __name__ == "__main__":
    main()
