"""What a GPU changes, checked where the tests run: the arithmetic settings a CUDA run takes and
gives back. (The whole suite runs on CUDA where torch sees a GPU: `--device auto` picks it.)"""

from __future__ import annotations

import torch

from onnxprune.runtime import reproducible


def _settings() -> tuple:
    cudnn = torch.backends.cudnn
    return (cudnn.conv.fp32_precision, cudnn.deterministic, cudnn.benchmark, torch.get_float32_matmul_precision())


def test_a_cuda_run_computes_in_full_float32_deterministically_and_gives_the_settings_back():
    cudnn = torch.backends.cudnn
    before = _settings()
    try:
        # a caller's own choices: TF32 everywhere, cuDNN autotuning
        cudnn.conv.fp32_precision, cudnn.benchmark = "tf32", True
        torch.set_float32_matmul_precision("high")
        caller = _settings()
        with reproducible(torch.device("cuda")):
            assert _settings() == ("ieee", True, False, "highest")
        assert _settings() == caller
        with reproducible(torch.device("cpu")):  # nothing to change on the CPU
            assert _settings() == caller
    finally:
        cudnn.conv.fp32_precision, cudnn.deterministic, cudnn.benchmark = before[:3]
        torch.set_float32_matmul_precision(before[3])
    assert _settings() == before
