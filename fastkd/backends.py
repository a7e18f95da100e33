"""Which backend runs a loss's row op, and the import of the Triton kernels that one of them runs.

The backends (`fastkd.options.BACKENDS`): "triton", the kernels of `fastkd.kernels` (compiled on
CUDA; in Triton's interpreter on CPU tensors, for checking); "torch", the plain-torch row ops
(the spec's closed form, chunked like the kernels); "reference", the spec itself with full
logits; "auto", Triton on CUDA tensors and torch elsewhere. A row op is one `RowOp`: its torch
function and its kernel launcher, with the same arguments.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkd.checks import choice
from fastkd.options import BACKENDS

KERNEL_MODULES = ("dense", "sparse", "mixture")  # fastkd.kernels' modules, imported together


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device` ("auto" resolved); for "triton", its kernels loaded."""
    choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        load_kernels(device)  # on CPU tensors: the kernels in Triton's interpreter
    return backend


def _interpreted(jit_function) -> bool:
    return type(jit_function).__name__ == "InterpretedFunction"


_TOO_LATE = (
    "backend='triton' on CPU tensors runs the kernels in Triton's interpreter, which Triton "
    "fixes for the whole process when it is first imported (torch.compile and torch custom ops "
    "import it: fastkd's loss is one), and this process imported it for compiling: set "
    "TRITON_INTERPRET=1 in the environment before the process starts (TRITON_INTERPRET=1 python "
    "...) or before its first import of torch._dynamo or triton, or use backend='torch' (or "
    "'auto') on CPU tensors"
)


def load_kernels(device: torch.device) -> None:
    """Import fastkd.kernels for tensors on `device`: compiled for CUDA, in Triton's interpreter
    for CPU tensors. @triton.jit reads TRITON_INTERPRET when it decorates a function, at import:
    Triton's own language functions when triton is first imported, fastkd's kernels when
    fastkd.kernels is (and Triton reads it again at launches). So a first backend="triton" call on
    CPU tensors in a process that has not imported triton yet sets TRITON_INTERPRET=1 for the rest
    of the process and imports both (every Triton kernel of the process then runs interpreted);
    otherwise TRITON_INTERPRET=1 must be set from the start. A ValueError saying so when the
    kernels cannot run on `device`."""
    cpu = device.type != "cuda"
    name = f"fastkd.kernels.{KERNEL_MODULES[0]}"
    if name not in sys.modules:
        lazy = cpu and os.environ.get("TRITON_INTERPRET") != "1"
        if lazy and "triton" in sys.modules and not _interpreted(
                sys.modules["triton"].language.zeros):
            raise ValueError(_TOO_LATE)
        if lazy:
            os.environ["TRITON_INTERPRET"] = "1"  # for good: Triton reads it at launches too
        for module in KERNEL_MODULES:
            importlib.import_module(f"fastkd.kernels.{module}")
    interpreted = _interpreted(sys.modules[name].dense_rows_kernel)
    if cpu and not interpreted:
        raise ValueError(_TOO_LATE)
    if not cpu and interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CUDA tensors: this process loaded the kernels in Triton's "
            "interpreter for an earlier backend='triton' call on CPU tensors (Triton decides "
            "once per process); run the GPU work in a process that does not do that first"
        )


@dataclass(frozen=True)
class RowOp:
    """One row op on every backend: `torch`, a plain-torch function (the spec's closed form);
    `triton`, its launcher in fastkd.kernels as "module.function" (imported at first use, after
    the front-end's `resolve_backend` loaded the kernels), with the same arguments."""

    torch: Callable
    triton: str

    def on(self, backend: str) -> Callable:
        if backend == "torch":
            return self.torch
        module, name = self.triton.split(".")
        return getattr(importlib.import_module(f"fastkd.kernels.{module}"), name)
