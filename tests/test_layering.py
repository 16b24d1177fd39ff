"""The library never imports the training program (DESIGN.md: "Library and program").

The program is ``vldistill.train`` (the loop, ``fit``, the quickstart) and ``vldistill.cli``; everything else under
``src/vldistill`` is the library.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import vldistill

PROGRAM = ("vldistill.train", "vldistill.cli")


def _is_program(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PROGRAM)


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(vldistill.__path__, "vldistill."))


def library_modules() -> list[str]:
    return [n for n in _all_modules() if not _is_program(n)]


def test_the_split_is_real():
    mods = _all_modules()
    assert {"vldistill.cache", "vldistill.losses", "vldistill.models", "vldistill.students"} <= set(mods)
    assert {"vldistill.train.loop", "vldistill.train.fit", "vldistill.train.quickstart", "vldistill.cli"} <= set(mods)


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vldistill'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_whole_library_in_a_fresh_interpreter_loads_no_program_module():
    # One interpreter importing every library module loads a program module exactly when one of them does.
    loaded = _loaded_after_importing(library_modules())
    assert set(library_modules()) <= set(loaded)
    culprits = [m for m in loaded if _is_program(m)]
    if culprits:  # name the library module responsible
        guilty = [m for m in library_modules() if any(_is_program(x) for x in _loaded_after_importing([m]))]
        raise AssertionError(f"{guilty} load the program modules {culprits}")


def _imported_names(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def test_no_library_source_imports_the_program_even_inside_a_function():
    root = Path(vldistill.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if _is_program(module):
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        bad = sorted(n for n in _imported_names(path, package) if _is_program(n))
        if bad:
            offenders.append(f"{module}: {bad}")
    assert not offenders, offenders
