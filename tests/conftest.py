"""Test set-up: on CPU the Triton kernels run under Triton's interpreter, which must be chosen
before the first `@triton.jit` runs, so before fastkd.kernels is imported anywhere. With
FASTKD_TEST_DEVICE=cuda (tests/_device.py) they are compiled for the GPU instead."""

import os

import pytest

if os.environ.get("FASTKD_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from _interpreter import speed_up

    speed_up()


@pytest.fixture(autouse=True, scope="session")
def _fastkd_cache(tmp_path_factory):
    """Token stores (fastkd.store) under a temp directory for the session, not the user's cache:
    tests that share data and a tokenizer share a store, as runs do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTKD_CACHE", str(tmp_path_factory.mktemp("fastkd-cache")))
        yield
