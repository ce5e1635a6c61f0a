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
from pathlib import Path

import torch

from .errors import UsageError
from .onnx_io import atomic_write_bytes

FORMAT = 1
# Settings that do not change the numbers a run produces.
_NOT_IN_FINGERPRINT = {"output", "report", "force", "progress", "resume", "checkpoint", "max_memory"}


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
