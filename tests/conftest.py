"""Test set-up: the Triton kernels run under Triton's CPU interpreter, which must be chosen before
the
first `@triton.jit` runs, so before fastkd.kernels is imported anywhere."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
