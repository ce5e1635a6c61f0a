"""Checkpoints of a run with several pruning steps, so that `--resume` continues where it stopped.

A checkpoint holds tensors, numbers, strings, lists and dicts only (no pickled code), is written
atomically after each completed phase, and is loaded with `torch.load(weights_only=True)`. It
carries a fingerprint of the input model and of every setting that changes the result, so a
checkpoint is never applied to a different run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .bridge.convert import TorchModel
from .errors import UsageError
from .estimators import Estimator
from .finetune import Finetuner
from .oneshot import Pruner, StepRecord
from .onnx_io import atomic_write_bytes
from .repair import Repairer

log = logging.getLogger("onnxprune")

FORMAT = 1
# Settings that do not change the numbers a run produces.
_NOT_IN_FINGERPRINT = {
    "output", "report", "force", "progress", "resume", "checkpoint", "max_memory",
    "speed_runs", "speed_batch", "speed_threads",
}  # fmt: skip


def fingerprint(config, model_path: Path) -> str:
    """sha256 of the input model's bytes and the result-changing settings."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    settings = {k: v for k, v in config.as_dict().items() if k not in _NOT_IN_FINGERPRINT}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` (plus the format number) to `path` atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, expected: str) -> dict:
    """The state saved at `path`; a checkpoint of another run or format is a usage error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume to start") from None
    except Exception as exc:  # a truncated or foreign file: unpickling errors of many kinds
        raise UsageError(f"--resume: {path} is not a readable onnxprune checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"--resume: {path} is not an onnxprune checkpoint of format {FORMAT}")
    if state.get("fingerprint") != expected:
        raise UsageError(
            f"--resume: {path} was written for another input model or other settings; "
            "rerun with the same ones, or without --resume to start over"
        )
    return state


@dataclass(frozen=True, kw_only=True)
class RunState:
    """What a run with several steps changes as it goes, and a checkpoint holds: the weights,
    the masks, the estimator's, the fine-tuner's and the repair's state, BatchNorm statistics."""

    torch_model: TorchModel
    pruner: Pruner
    estimator: Estimator
    trainer: Finetuner | None
    batchnorm: dict[str, torch.Tensor]
    repairer: Repairer | None = None


def checkpoint_state(fingerprint_: str, phases_done: int, run: RunState) -> dict:
    """Everything a resumed run needs to continue exactly as this one would have: tensors,
    masks, optimiser and estimator state, the step records. Tensors and plain values only."""
    pruner, trainer = run.pruner, run.trainer
    names = [v.target.name for v in pruner.views] + (list(trainer.tensors) if trainer else [])
    return {
        "fingerprint": fingerprint_,
        "phases_done": phases_done,
        "tensors": {name: run.torch_model.tensors[name].detach().cpu().clone() for name in names},
        "batchnorm": {name: t.detach().cpu().clone() for name, t in run.batchnorm.items()},
        "masks": {name: m.cpu() for name, m in pruner.masks().items()},
        "records": [list(vars(r).values()) for r in pruner.records],
        "estimator": run.estimator.state_dict(),
        "finetune": trainer.state_dict() if trainer else {},
        "repair": run.repairer.state_dict() if run.repairer else {},
    }


def resume(path: Path, fingerprint_: str, run: RunState) -> int:
    """Restore the state saved in the checkpoint at `path`; returns the number of phases it completed."""
    state = load_checkpoint(path, fingerprint_)
    with torch.no_grad():
        for name, value in state["tensors"].items():
            run.torch_model.tensors[name].copy_(value)
        for name, value in state["batchnorm"].items():
            run.batchnorm[name].copy_(value)
    run.pruner.restore_masks(state["masks"])
    run.pruner.records = [StepRecord(*values) for values in state["records"]]
    if state["estimator"]:
        shapes = {v.target.name: v.shape for v in run.pruner.views}
        run.estimator.load_state_dict(state["estimator"], shapes)
    if run.trainer is not None and state["finetune"]:
        run.trainer.load_state_dict(state["finetune"])
    if run.repairer is not None and state.get("repair"):
        run.repairer.load_state_dict(state["repair"])
    log.info("resuming from %s after step %d", path, state["phases_done"])
    return int(state["phases_done"])
