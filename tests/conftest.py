"""Test set-up: on CPU the Triton kernels run under Triton's interpreter, which must be chosen
before the first `@triton.jit` runs, so before fastkd.kernels is imported anywhere. With
FASTKD_TEST_DEVICE=cuda (tests/_device.py) they are compiled for the GPU instead."""

import os

if os.environ.get("FASTKD_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from _interpreter import speed_up

    speed_up()
