"""Triton's interpreter, faster for tests: no re-patching of triton.language per device call.

In Triton 3.9's interpreter every call of a @triton.jit helper from inside a kernel re-runs
`_patch_lang` (an `inspect.getmembers` sweep over triton.language) although the kernel's launch
already patched those very modules and keeps them patched until it returns; fastkd's row kernels
call small helpers in every tile, so that sweep was about half of a test's time. Inside a launch
this skips the redundant sweep; outside one (or on another Triton) nothing changes. The
interpreted arithmetic is untouched: the same patched functions run either way."""

from __future__ import annotations


def speed_up() -> None:
    try:
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    grid = getattr(interp, "GridExecutor", None)
    fn_cls = getattr(interp, "InterpretedFunction", None)
    if grid is None or fn_cls is None or hasattr(grid, "_fastkd_patched"):
        return
    grid._fastkd_patched = set()  # ids of the globals whose triton.language is patched now
    launch, device_call = grid.__call__, fn_cls.__call__

    def patched_launch(self, *args, **kwargs):
        outer = set(grid._fastkd_patched)
        grid._fastkd_patched.add(id(self.fn.__globals__))
        try:
            return launch(self, *args, **kwargs)
        finally:  # the launch restores what it patched: helpers patch again next launch
            grid._fastkd_patched = outer

    def patched_device_call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if key not in grid._fastkd_patched:
            out = device_call(self, *args, **kwargs)  # patches its module's language, then runs
            if grid._fastkd_patched:  # inside a launch: that patch now stands until it ends
                grid._fastkd_patched.add(key)
            return out
        try:  # as InterpretedFunction.__call__, less the _patch_lang already in force
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    grid.__call__, fn_cls.__call__ = patched_launch, patched_device_call
