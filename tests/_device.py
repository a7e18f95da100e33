"""The device the loss tests run on: CPU (the Triton kernels under the interpreter) by default;
`FASTKD_TEST_DEVICE=cuda pytest tests/test_dense.py tests/test_loss_api.py` runs the same tests
with every tensor on the GPU and the kernels compiled (bench/gpu_session.sh does)."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("FASTKD_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"
