"""The checks of a setting's value, each written once: one of a fixed set (`choice`), a finite real
number (`real`), a positive one (`positive`), a positive int (`positive_int`), one path or more
(`path_list`).

Each raises the error a user should see, naming the setting: a ValueError for a value out of its
range, a TypeError for a value of the wrong type. Free of torch (the command line's settings use
them before torch is imported).
"""

from __future__ import annotations

import math
import os
from numbers import Real


def choice(name: str, value, allowed: tuple):
    """value if it is one of `allowed`, else a ValueError naming the setting and the choices."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def real(name: str, value: object) -> float:
    """value as a float: a TypeError unless it is a real number (a bool is not one), a ValueError
    unless it is finite."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive(name: str, value: object, *, or_zero: bool = False,
             optional: bool = False) -> float | None:
    """value as a finite float > 0 (>= 0 with or_zero; None passes with optional), else the
    error `real` raises or a ValueError."""
    if optional and value is None:
        return None
    value = real(name, value)
    if value < 0 or (value == 0 and not or_zero):
        bound = f"{'>=' if or_zero else '>'} 0{' or None' if optional else ''}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def positive_int(name: str, value: object, *, or_zero: bool = False,
                 optional: bool = False) -> int | None:
    """value if it is an int > 0 (>= 0 with or_zero; a bool is not one; None passes with
    optional), else a ValueError."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if or_zero else 1):
        kind = "non-negative" if or_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int{' or None' if optional else ''}, got "
                         f"{value!r}")
    return value


def path_list(name: str, value, what: str) -> list[str]:
    """value, a path or several, as a list of str; a ValueError naming the setting if it names
    none ("pass at least one {what}")."""
    listed = [str(p) for p in ([value] if isinstance(value, (str, os.PathLike)) else value)]
    if not listed:
        raise ValueError(f"{name}: pass at least one {what}")
    return listed


def check_seq_len(seq_len: int) -> None:
    """seq_len, the tokens of a training row: at least 2 (a next-token target needs 2)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs 2 tokens), "
                         f"got {seq_len!r}")


def check_num_proc(num_proc) -> None:
    """num_proc, the processes that prepare a token store (fastkd.prepare): a positive int or
    None (fastkd.prepare's choice)."""
    positive_int("num_proc", num_proc, optional=True)
