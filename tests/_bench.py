"""Import bench/ (a folder of the checkout, not of the installed package) in tests."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_bench(module: str):
    """Import bench.<module> from the repo without putting the repo root on sys.path, which would
    expose the folder kernels/ as a top-level `kernels` to transformers in this test session."""
    if "bench" not in sys.modules:
        folder = REPO / "bench"
        spec = importlib.util.spec_from_file_location(
            "bench", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{module}")
