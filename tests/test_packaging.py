"""The package as a user installs it: a wheel built from the checkout holds every module, and
each public module imports from that wheel, not from the checkout."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    """Every module of the checkout, named as installed (kernels/ is fastkd.kernels)."""
    names = set()
    for root, prefix in ((REPO / "fastkd", "fastkd"), (REPO / "kernels", "fastkd.kernels")):
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join([prefix, *parts]))
    return names


def test_wheel_holds_and_imports_every_module(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("fastkd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = {name for name in zf.namelist() if name.endswith(".py")}
        # the CPU row ops' C++ source, compiled at first use (without it the CPU path falls back)
        assert "fastkd/cpu_rows.cpp" in zf.namelist()
    in_wheel = set()
    for name in files:
        parts = name[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        in_wheel.add(".".join(parts))
    modules = _source_modules()
    assert modules <= in_wheel, f"missing from the wheel: {sorted(modules - in_wheel)}"
    assert not any(m == "kernels" or m.startswith("kernels.") for m in in_wheel), \
        "kernels/ must install as fastkd.kernels, never as a top-level `kernels`"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # Import each module in a fresh interpreter whose cwd is not the checkout, with the wheel's
    # files first on the path (the venv's own site-packages still give torch, transformers...).
    public = sorted(m for m in modules if not m.rsplit(".", 1)[-1].startswith("_")
                    and m != "fastkd.__main__")
    script = (
        "import importlib, sys\n"
        f"target = {str(target)!r}\n"
        "for name in sys.argv[1:]:\n"
        "    mod = importlib.import_module(name)\n"
        "    assert mod.__file__.startswith(target), (name, mod.__file__)\n"
        "print('ok', len(sys.argv) - 1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, *public], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(public)}"


# Where an optional package may be imported (lazily, with a message naming what to install), and
# the extra that brings it; every other third-party import must be a core dependency.
OPTIONAL = {"peft": ({"fastkd/lora.py"}, "lora"),
            "datasets": ({"fastkd/readers.py", "fastkd/integrations/"}, "hf"),
            "accelerate": ({"fastkd/integrations/"}, "hf"),
            "trl": ({"fastkd/integrations/"}, "trl")}
# import name -> the distribution that provides it, where they differ or come with another
PROVIDED_BY = {"huggingface_hub": "transformers"}


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / "fastkd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "fastkd":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_is_a_declared_dependency():
    """`pip install -e .` must give everything the demo and `fastkd distill` import (pyarrow was
    missing once: the demo failed on a fresh machine while the suite, with its test extra,
    passed)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    core = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    found = _third_party_imports()
    assert {"torch", "pyarrow", "transformers"} <= found.keys()  # the scan sees imports at all
    for module, files in sorted(found.items()):
        dist = PROVIDED_BY.get(module, module).lower()
        if module in OPTIONAL:
            allowed, extra = OPTIONAL[module]
            outside = {f for f in files if not any(f.startswith(a) for a in allowed)}
            assert not outside, f"{module} (extra {extra!r}) imported outside {allowed}: {outside}"
            assert dist in extras[extra], f"{module} missing from the {extra!r} extra"
        else:
            assert dist in core, f"{module} is imported by {sorted(files)} but is no dependency"
