"""What the tool runs on: versions of the libraries that shape results, and the devices they see."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """Versions of onnxprune, Python, torch (and its CUDA), onnx, onnxruntime (and its
    providers), onnx2torch and numpy; for the report, the HTML page and `--version`."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    from . import __version__, distributed

    cuda = torch.cuda.is_available()
    runtime = next(
        (f"{name} {v}" for name in ("onnxruntime-gpu", "onnxruntime") if (v := _version(name))),
        f"onnxruntime {onnxruntime.__version__}",
    )
    return {
        "onnxprune": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "onnx": onnx.__version__,
        "onnx_ir_version": onnx.IR_VERSION,
        "onnx_opset": onnx.defs.onnx_opset_version(),
        "onnxruntime": runtime,
        "onnxruntime_providers": list(onnxruntime.get_available_providers()),
        "onnx2torch": _version("onnx2torch"),
        "numpy": numpy.__version__,
        "executable": sys.executable,
        "ranks": distributed.describe(),
    }


def format_versions(env: dict[str, Any]) -> str:
    """`onnxprune --version`: one line per component."""
    cuda = env["torch_cuda_build"]
    device = f"CUDA device: {env['cuda_device']}" if env["cuda_available"] else "no usable CUDA device"
    return "\n".join(
        [
            f"onnxprune {env['onnxprune']}",
            f"python {env['python']} ({env['platform']})",
            f"torch {env['torch']} ({'CUDA ' + str(cuda) + ' build' if cuda else 'CPU build'}; {device})",
            f"onnx {env['onnx']} (IR version {env['onnx_ir_version']}, opset {env['onnx_opset']})",
            f"{env['onnxruntime']} (providers: {', '.join(env['onnxruntime_providers'])})",
            f"onnx2torch {env['onnx2torch']}",
            f"numpy {env['numpy']}",
        ]
    )
