"""The CPU path's row ops as fused native loops: per token, the loss and dloss/dlogits over a
chunk's logit rows in a few passes over a row that stays in the core's cache, instead of the
spec's ten or so V-wide tensor ops (each a trip through memory).

`dense_rows` and `sparse_rows` are the dense and the sparse teacher's row ops (the torch row
ops of `fastkd.dense` and `fastkd.sparse` call them, and so do the routed teachers' members),
with the arguments of the Triton launchers `dense_rows` and `sparse_rows`. The loops are C++
(cpu_rows.cpp, beside this file; its header lists the passes, docs/math.md derives them): fp32
arithmetic with double accumulators, exp, log and tanh as vector polynomials, each exponential
taken once a token and id and kept in the thread's scratch (4 rows of V floats) for the later
passes, the rows dealt
out to torch's CPU thread count (`torch.get_num_threads()`), each thread taking the next row when
it finishes one (a thread preempted on a shared machine holds up one row, not a block). bf16 and
fp16 logit buffers are read and written in place; float64 runs the spec (the native loop is
fp32).

A term whose weight is 0 is skipped when its value is not wanted (`components=False`: the
call's `fastkd.forms.Plan.components`, False unless it asked for return_components): no CE
pass for ce_weight=0, no teacher row work for kd_weight=0 (the dense form then skips the
teacher's GEMM too, passing no teacher logits).

Built once per machine: the first call compiles cpu_rows.cpp with the system's C++ compiler
($CXX, else c++) into `fsio.user_cache_dir()/native/cpu_rows-<key>.so` (3 to 5 s with g++
12; the key hashes the source, the compiler's version, the flags and this CPU's model and feature
flags, so a changed source or another machine gets its own build); every later process loads
that file, and every call after the first in a process reuses it (options, shapes and dtypes
are arguments: nothing is compiled per call). Where it cannot be built or loaded (no compiler,
a failed build), the row ops run the spec chunk by chunk instead (slower, the same results to
rounding) and say so once, with a RuntimeWarning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from fastkd import fsio
from fastkd.options import DIVERGENCES, DistillOptions
from fastkd.reference import SPARSE_TAILS

SOURCE = Path(__file__).with_name("cpu_rows.cpp")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-pthread",
         "-fno-math-errno")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # cpu_rows.cpp's Dtype


class _Options(ctypes.Structure):
    """cpu_rows.cpp's Options: DistillOptions as numbers, and which terms to compute."""

    _fields_ = [*((name, ctypes.c_int32) for name in (
                    "divergence", "ce", "kd", "values", "grad", "tail")),
                ("ignore_index", ctypes.c_int64),
                *((name, ctypes.c_double) for name in (
                    "temperature", "mix", "ce_weight", "kd_weight", "s_scale", "t_scale", "s_cap",
                    "t_cap"))]


def _options(opts: DistillOptions, grad: bool, components: bool, tail: str = "bucket"):
    return _Options(
        DIVERGENCES.index(opts.divergence), opts.ce_weight > 0 or components,
        opts.kd_weight > 0 or components, components, grad, SPARSE_TAILS.index(tail),
        opts.ignore_index, opts.temperature, opts.mix, opts.ce_weight, opts.kd_weight,
        opts.student_logit_scale, opts.teacher_logit_scale, opts.student_softcap or 0.0,
        opts.teacher_softcap or 0.0)


# ---- the build ---------------------------------------------------------------------------------

def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _machine() -> str:
    """This CPU's model and feature flags (-march=native compiles for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep)) or f"{platform.machine()} {platform.processor()}"


def build(cache_dir: Path | None = None) -> Path:
    """The compiled row ops' path, compiling them first if this machine has no build yet; a
    RuntimeError saying why if the compiler is missing or fails."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"no working C++ compiler {cxx!r} ({error})") from error
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _machine().encode()])).hexdigest()[:16]
    folder = (cache_dir or fsio.user_cache_dir()) / "native"
    target = folder / f"cpu_rows-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # each process builds in its own temp folder and renames: concurrent first calls are safe
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([cxx, *FLAGS, "-o", str(built), str(SOURCE)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": the loaded library, or None after a failed build


def library() -> ctypes.CDLL | None:
    """The loaded row ops, built on first use; None (after one RuntimeWarning per process) where
    they cannot be built or loaded."""
    with _LOCK:
        if "lib" not in _STATE:
            try:
                lib = ctypes.CDLL(str(build()))
            except (RuntimeError, OSError) as error:
                warnings.warn(
                    f"fastkd: the fused CPU row op is unavailable ({error}); the CPU path runs "
                    "the plain-torch spec chunk by chunk instead (same results, several times "
                    "slower). Install a C++ compiler (or set CXX) to build it.",
                    RuntimeWarning, stacklevel=4)
                lib = None
            else:
                rows = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64]
                tail = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.POINTER(_Options), ctypes.c_int32]
                lib.fastkd_dense_rows.argtypes = [*rows, *rows, *tail]
                lib.fastkd_sparse_rows.argtypes = [*rows, ctypes.c_void_p, ctypes.c_void_p,
                                                   ctypes.c_int64, *tail]
            _STATE["lib"] = lib
        return _STATE["lib"]


# ---- the row ops -------------------------------------------------------------------------------

def native(dtypes) -> bool:
    """Whether the row ops run natively for these compute dtypes (not float64) on this machine."""
    if not all(dtype in DTYPES for dtype in dtypes):
        return False
    if torch.compiler.is_compiling():  # traced code builds nothing: whether a call loaded it
        return _STATE.get("lib") is not None
    return library() is not None


def _rows_ok(x: torch.Tensor | None) -> bool:
    """A (rows, width) CPU logit buffer the native loop reads: fp32, bf16 or fp16, unit column
    stride."""
    return x is None or (x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2
                         and (x.stride(1) == 1 or x.shape[1] <= 1))


def _applies(s, t, labels, row_scale, out) -> bool:
    return (_rows_ok(s) and _rows_ok(t) and out.dtype == row_scale.dtype == torch.float32
            and out.is_contiguous() and (labels is None or labels.dtype == torch.int64))


def _pointer(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def dense_rows(s, t, labels, row_scale, out, opts: DistillOptions, compute_grad: bool,
               components: bool = True) -> bool:
    """The dense row op natively: per-token (loss, ce, kd, entropy) into out (n, 4) fp32 and, if
    compute_grad, G = row_scale dloss/ds over s (n, V) in place; t (n, K) the teacher's logits
    over the shared ids, or None when kd_weight=0 and components=False (the KD term skipped).
    Returns False, having done nothing, where it does not apply (no build here, float64, an
    unusual layout): the caller then runs the spec."""
    if not _applies(s, t, labels, row_scale, out):
        return False
    lib = library()
    if lib is None:
        return False
    n, vocab = s.shape
    _check(lib.fastkd_dense_rows(
        s.data_ptr(), s.stride(0), DTYPES[s.dtype], vocab,
        _pointer(t), 0 if t is None else t.stride(0), DTYPES[s.dtype if t is None else t.dtype],
        0 if t is None else t.shape[1], *_rest(labels, row_scale, out, n),
        ctypes.byref(_options(opts, compute_grad, components)), torch.get_num_threads()))
    return True


def sparse_rows(s, ids, logprobs, labels, row_scale, out, opts: DistillOptions, tail: str,
                compute_grad: bool, components: bool = True) -> bool:
    """The sparse row op natively (the arguments of the Triton launcher `sparse_rows`): per-token
    values into out and, if compute_grad, G over s in place; ids (n, k) integer (-1: unused
    slot), logprobs (n, k). False, having done nothing, where it does not apply (as
    `dense_rows`)."""
    if not _applies(s, None, labels, row_scale, out):
        return False
    lib = library()
    if lib is None:
        return False
    n, vocab = s.shape
    ids = ids.to(torch.int64).contiguous()
    logprobs = logprobs.to(torch.float32).contiguous()
    _check(lib.fastkd_sparse_rows(
        s.data_ptr(), s.stride(0), DTYPES[s.dtype], vocab, ids.data_ptr(), logprobs.data_ptr(),
        ids.shape[1], *_rest(labels, row_scale, out, n),
        ctypes.byref(_options(opts, compute_grad, components, tail)), torch.get_num_threads()))
    return True


def _rest(labels, row_scale, out, n) -> tuple:
    """The labels, row scale and output pointers and the row count, as the C functions take
    them."""
    return (None if labels is None else labels.contiguous().data_ptr(),
            row_scale.contiguous().data_ptr(), out.data_ptr(), n)


def _check(status: int) -> None:
    if status:
        raise MemoryError("fastkd's CPU row op could not allocate its per-thread row buffers")
