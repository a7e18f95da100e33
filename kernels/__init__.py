"""Triton kernels of fastkd, installed as `fastkd.kernels` (never as a top-level `kernels`).

Kernels only: no autograd and no argument checking; the loss forms launch them through their row
ops (`fastkd.backends.RowOp`).

Imported as a top-level `kernels` (the repository root is on sys.path: `python -c`, `python -m
pytest`, `python -m bench` run from a clone), this folder would shadow Hugging Face's `kernels`
package, which transformers and TRL import (`from kernels import ...`). It then loads that package
from the rest of sys.path and puts it in its own place in sys.modules (the import system returns
what sys.modules holds once a module's code has run), or raises ModuleNotFoundError as if this
folder were not there.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _load_hub_kernels() -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder "
                                      "is fastkd.kernels, not the Hugging Face package)",
                                      name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _load_hub_kernels()
