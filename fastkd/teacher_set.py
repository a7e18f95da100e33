"""Several teachers in `fastkd distill`: how they are named, how each example finds its teacher,
and the rules, checked before anything loads (fastkd.config calls these; nothing here imports
torch).

    --teacher NAME=PATH            repeatable; a plain --teacher PATH is one unnamed teacher (a
                                   value that exists as a path is a path, '=' or not)
    --teacher-cache NAME=DIR       repeatable; the same NAME in both: the cache of that teacher
    --data FILE:NAME               FILE's examples distil from teacher NAME (FILE:NAME is a route
                                   when NAME is a declared teacher and FILE:NAME is no path)
    {"teacher": NAME}              a JSONL record's field (a dataset's column) routes that record,
                                   before its file's route
    --teacher-weights A=W,B=W      every token distils from the mixture instead (dense teachers)

The rules: one teacher needs no name (and its run is the single-teacher run, whatever its
name); with several, every example is routed or every token mixed (an example that is neither
is refused, naming its file and record); a name that is no teacher's is refused, with the
closest name. Routing is per token: the token store records each token's teacher, so packing
is the same with or without routes (a cache made on the plain data covers the routed run's
sequences); an online teacher runs on the rows that hold any of its tokens.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re

TEACHER_FIELD = "teacher"  # the record field (dataset column) naming a record's teacher
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
MAX_MIXED = 4  # teachers a mixture takes (fastkd.mixture)


def record_teacher(value, where: str) -> str:
    """A record's "teacher" field: a teacher's name, or a ValueError naming the record."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'{where}: "{TEACHER_FIELD}" must be a teacher\'s name (a string), got '
                         f"{value!r}")
    return value


def unknown_teacher(name: str, names, where: str) -> ValueError:
    """The error for a name that is no teacher's, with the closest one (as the CLI's hints)."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}: teacher {name!r} is not one of the teachers "
                      f"({', '.join(map(repr, names)) or 'none named'}){hint}")


def split_named(value: str, flag: str) -> tuple[str | None, str]:
    """(name, path) of one --teacher / --teacher-cache value: NAME=PATH, or PATH (unnamed)."""
    if os.path.exists(os.path.expanduser(value)) or "=" not in value:
        return None, value
    name, path = value.split("=", 1)
    if not NAME.fullmatch(name) or not path:
        raise ValueError(f"{flag} {value!r}: expected NAME=PATH (NAME: letters, digits, _ . -; "
                         "not starting with a digit) or a path that exists")
    return name, path


def named(values: list[str] | None, flag: str) -> tuple[str | None, dict[str, str]]:
    """(the one unnamed value or None, {name: path}) of a repeatable option's values."""
    unnamed, by_name = [], {}
    for value in values or []:
        name, path = split_named(value, flag)
        if name is None:
            unnamed.append(path)
        elif name in by_name:
            raise ValueError(f"{flag}: teacher {name!r} is given twice")
        else:
            by_name[name] = path
    if len(unnamed) > 1 or (unnamed and by_name):
        raise ValueError(f"{flag}: with several teachers, name each one ({flag} NAME=PATH)")
    return (unnamed[0] if unnamed else None), by_name


def parse_weights(text: str) -> dict[str, float]:
    """--teacher-weights NAME=W,NAME=W as {name: w}."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--teacher-weights: {item!r} is not NAME=W (W a number); expected "
                             "NAME=W,NAME=W") from None
    return weights


def check_weights(weights: dict[str, float], online: list[str], cached: list[str]) -> dict:
    """A mixture's weights, one an online teacher (missing: 0), each >= 0, summing to 1."""
    for name, w in weights.items():
        if name in cached:
            raise ValueError(f"teacher_weights: teacher {name!r} is a cache (sparse): a mixture "
                             "takes resident (dense) teachers; route its examples instead")
        if name not in online:
            raise unknown_teacher(name, online, "teacher_weights")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"teacher_weights: teacher {name!r}'s weight must be a number >= 0, "
                             f"got {w!r}")
    if cached:
        raise ValueError(f"teacher_weights mixes resident teachers only; {cached} are caches: "
                         "route their examples (--data FILE:NAME) instead of mixing")
    if len(online) > MAX_MIXED:
        raise ValueError(f"teacher_weights: a mixture takes at most {MAX_MIXED} teachers, got "
                         f"{len(online)}")
    if abs(sum(weights.values()) - 1.0) > 1e-6:
        raise ValueError(f"teacher_weights must sum to 1, got {sum(weights.values()):.9g} "
                         f"({weights})")
    return {name: float(weights.get(name, 0.0)) for name in online}


def split_data(entries: list[str], names: list[str]) -> tuple[list[str], list[str | None]]:
    """(paths, routes) of --data values: FILE:NAME routes FILE to teacher NAME, where FILE:NAME
    is no path that exists; a NAME that is no teacher's (after a FILE that exists) is refused."""
    paths, routes = [], []
    for entry in entries:
        entry = str(entry)
        head, sep, name = entry.rpartition(":")
        local = os.path.expanduser(head)
        if os.path.exists(os.path.expanduser(entry)) or not sep or os.sep in name:
            paths.append(entry)
            routes.append(None)
        elif name in names:
            paths.append(head)
            routes.append(name)
        elif os.path.exists(local) or glob.has_magic(head):
            raise unknown_teacher(name, names, f"--data {entry}")
        else:
            paths.append(entry)  # no such file: fastkd.readers.expand_data names it
            routes.append(None)
    return paths, routes


def check_routable(paths: list[str], routes: list[str | None]) -> None:
    """With several teachers and no mixture, a text file (no records to name a teacher) needs
    a route: refused at once, naming it."""
    for path, route in zip(paths, routes, strict=True):
        if route is None and path.endswith(".txt"):
            raise ValueError(f"--data {path}: with several teachers every example must be "
                             f"routed: a text file names no teacher, so route it ({path}:NAME) "
                             "or mix the teachers (--teacher-weights NAME=W,...)")


def check_routing(routing: dict, names: list[str]) -> None:
    """A token store's routing summary (fastkd.prepare) against the run's teachers: every name
    a teacher's, every example routed; errors name the first record concerned."""
    for name, where in routing["first"].items():
        if name not in names:
            raise unknown_teacher(name, names, where)
    if routing["unrouted"]:
        raise ValueError(f"{routing['unrouted_at']}: with {len(names)} teachers every example "
                         f"must be routed, and this one ({routing['unrouted']} in all) names "
                         f'none: give it a "{TEACHER_FIELD}" field, route its file (--data '
                         "FILE:NAME) or mix the teachers (--teacher-weights NAME=W,...)")


def teacher_fields(teacher: list[str] | None, cache: list[str] | None,
                   weights: str | None) -> dict:
    """DistillConfig's teacher fields from `fastkd distill`'s repeatable --teacher and
    --teacher-cache values and its --teacher-weights."""
    unnamed, online = named(teacher, "--teacher")
    unnamed_cache, cached = named(cache, "--teacher-cache")
    if (online or cached) and (unnamed or unnamed_cache):
        raise ValueError("with named teachers, name each one (--teacher NAME=PATH, "
                         "--teacher-cache NAME=DIR)")
    return {"teacher": unnamed, "teacher_cache": unnamed_cache, "teachers": online or None,
            "teacher_caches": cached or None,
            "teacher_weights": None if weights is None else parse_weights(weights)}
