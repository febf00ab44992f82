"""Which source files decide a result, and their fingerprint: the code part of the cache and checkpoint keys.

ZenML keys a step on its own source, and lorapipe's steps are thin: the code that decides their results lives in
the library. `dependency_files` follows a file's first-party imports (module- and function-level, read with `ast`,
nothing is imported) to every file it can run; `code_version` hashes them (so import by name, never through
`importlib` with a computed string, or the dependency goes unseen). The `__init__.py` files of the packages on the
way are hashed but not followed: importing `steps.train` runs `steps/__init__.py`, which imports every step, yet only
what `steps.train` itself imports can change its result.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

# The folder holding lorapipe/, steps/, materializers/ and pipelines/: ZenML's source root for this project.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("lorapipe", "steps", "materializers", "pipelines")


def module_file(module: str) -> Path | None:
    """The source file of a first-party module or package, or None when it is not one."""
    base = SOURCE_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(module: str) -> list[Path]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    found = []
    for i in range(1, len(parts)):
        init = SOURCE_ROOT.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            found.append(init)
    return found


def _module_of(path: Path) -> str:
    rel = path.relative_to(SOURCE_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def imported_modules(path: Path) -> frozenset[str]:
    """First-party modules a file imports anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .mod import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` depends on the submodule, not on all of pkg
                submodule = f"{base}.{alias.name}"
                found.add(submodule if module_file(submodule) is not None else base)
    return frozenset(m for m in found if m.split(".")[0] in FIRST_PARTY)


@functools.lru_cache(maxsize=None)
def _closure(start: Path) -> tuple[Path, ...]:
    seen: set[Path] = set(_package_inits(_module_of(start)))  # hashed, not followed (see the module docstring)
    followed: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in followed:
            continue
        followed.add(path)
        seen.add(path)
        for module in imported_modules(path):
            seen.update(_package_inits(module))
            dep = module_file(module)
            if dep is not None and dep not in followed:
                todo.append(dep)
    return tuple(sorted(seen))


def dependency_files(*entry_points: str | Path) -> list[str]:
    """Every first-party file the given files can run, as paths relative to SOURCE_ROOT (sorted)."""
    files: set[Path] = set()
    for entry in entry_points:
        path = Path(entry)
        path = (path if path.is_absolute() else SOURCE_ROOT / path).resolve()
        if path.suffix != ".py":  # a module name
            found = module_file(str(entry))
            if found is None:
                raise ValueError(f"{entry} is neither a source file nor a first-party module")
            path = found
        files.update(_closure(path))
    return sorted(p.relative_to(SOURCE_ROOT).as_posix() for p in files)


def code_version(*entry_points: str | Path) -> str:
    """sha256 (16 hex digits) over the path and bytes of every file the entry points can run."""
    h = hashlib.sha256()
    for rel in dependency_files(*entry_points):
        h.update(rel.encode() + b"\0")
        h.update((SOURCE_ROOT / rel).read_bytes())
    return h.hexdigest()[:16]
