"""The quorum core is pure: it decides what is durable and what to cut from values alone.

The modules below may not import grpc, lmdb, threading, time, random, socket or os: no network,
no disk, no threads, no clock, no randomness, no environment. Two checks:

* their own source, read with `ast`, has no import statement (or `__import__`/`import_module`
  call) naming one of those modules;
* in a fresh interpreter where any engine module that imports one of them gets an ImportError,
  each module imports cleanly, and none of those modules gets loaded along the way (a guard on
  `__import__` catches `os` and `time` too, which the interpreter loads at start-up). The parent
  packages `engine` and `engine.core` are stood in for by bare packages: `engine/__init__.py` is
  the public face of the whole engine and imports everything, which says nothing about the core.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine

PURE_MODULES = (
    "engine.core.constants",
    "engine.core.types",
    "engine.core.quorum",
    "engine.core.recovery",
    "engine.core.placement",
    "engine.core.membership",
    "engine.core.tail",
    "engine.core.fencing",
    "engine.core.admission",
    "engine.core.changes",
)
FORBIDDEN = ("grpc", "lmdb", "threading", "time", "random", "socket", "os")
ROOT = Path(engine.__file__).resolve().parent.parent


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import statement and every dynamic import with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    return found


def test_the_import_checker_sees_every_kind_of_import():
    source = "import os.path\nfrom time import monotonic\ndef f():\n    import threading\n    __import__('random')\n"
    assert [name for _line, name in imported_names(ast.parse(source))] == ["os.path", "time", "threading", "random"]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_a_pure_module_imports_nothing_impure_in_its_own_source(module):
    path = Path(importlib.util.find_spec(module).origin)
    names = imported_names(ast.parse(path.read_text(), str(path)))
    assert names, "the checker found no imports at all: it is not reading the module"
    bad = [(line, name) for line, name in names if name.split(".")[0] in FORBIDDEN]
    assert bad == [], f"{module} imports {bad}"


GUARD = r"""
import builtins, importlib.abc, json, sys, types

root, target, forbidden = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
# Bare stand-ins for the parent packages, so that their __init__ (the whole engine) does not run.
for name, sub in (("engine", "engine"), ("engine.core", "engine/core")):
    pkg = types.ModuleType(name)
    pkg.__path__ = [f"{root}/{sub}"]
    sys.modules[name] = pkg
sys.modules["engine"].core = sys.modules["engine.core"]

preloaded = {m for m in forbidden if m in sys.modules}
violations = []

class Refuse(importlib.abc.MetaPathFinder):
    # Not loaded yet: nobody in this import may load them, whoever asks.
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in forbidden:
            violations.append(["(import system)", fullname])
            raise ImportError(f"{fullname} is forbidden in the pure core")
        return None

real_import = builtins.__import__

def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # Already loaded at start-up (os, time): refuse them to engine modules by the importer's name.
    importer = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] in forbidden and importer.split(".")[0] == "engine":
        violations.append([importer, name])
        raise ImportError(f"{importer} imports {name}: forbidden in the pure core")
    return real_import(name, globals, locals, fromlist, level)

sys.meta_path.insert(0, Refuse())
builtins.__import__ = guarded_import
error = None
try:
    __import__(target)
except ImportError as e:
    error = str(e)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden and m.split(".")[0] not in preloaded)
engine_modules = sorted(m for m in sys.modules if m.split(".")[0] == "engine")
print(json.dumps({"error": error, "violations": violations, "loaded": loaded, "engine_modules": engine_modules}))
"""


TWINS = ("python", "cython")
CYTHON_BUILT = importlib.util.find_spec("engine.codec._cython") is not None


def import_guarded(module: str, forbidden=FORBIDDEN, twin: str = "python") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", GUARD, str(ROOT), module, ",".join(forbidden)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        env={**os.environ, "SIXFOLD_CODEC": twin},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_guard_catches_an_engine_module_that_imports_a_forbidden_module():
    # engine.head.writer runs threads and reads the clock: the guard must say so.
    result = import_guarded("engine.head.writer")
    assert result["error"] is not None
    assert any(importer.startswith("engine") for importer, _name in result["violations"]), result


def twin_params(module: str, with_os: bool):
    for twin in TWINS:
        marks = []
        if twin == "cython" and not CYTHON_BUILT:
            marks.append(pytest.mark.skip(reason="the Cython twin is not built"))
        yield pytest.param(module, twin, marks=marks, id=f"{module.rsplit('.', 1)[1]}-{twin}")


@pytest.mark.parametrize("module,twin", [p for m in PURE_MODULES for p in twin_params(m, with_os=True)])
def test_a_pure_module_loads_no_impure_module_in_a_fresh_interpreter(module, twin):
    result = import_guarded(module, FORBIDDEN, twin)
    assert (result["error"], result["violations"], result["loaded"]) == (None, [], []), result
    assert module in result["engine_modules"]


@pytest.mark.parametrize("module,twin", [p for m in PURE_MODULES for p in twin_params(m, with_os=False)])
def test_a_pure_module_loads_no_network_disk_thread_clock_or_randomness(module, twin):
    """The same without `os`, to tell reading the environment apart from the rest."""
    result = import_guarded(module, tuple(m for m in FORBIDDEN if m != "os"), twin)
    assert (result["error"], result["violations"], result["loaded"]) == (None, [], []), result
    assert module in result["engine_modules"]
