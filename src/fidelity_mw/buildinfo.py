"""Which build of fidelity_mw is running: pure Python, or with modules compiled by mypyc.

The opt-in compiled wheel (docs/compiled.md) ships an extension module beside each compiled
module's .py file; Python's import system prefers the extension module, so a module that has
one for this interpreter is the module that runs. Behaviour is the same in both builds; bug
reports should say which one ran (`fidelity-mw --version` prints it).
"""

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

__all__ = ["build_name", "compiled", "compiled_modules"]


def _find() -> tuple[str, ...]:
    package = Path(__file__).resolve().parent
    found: set[str] = set()
    for suffix in EXTENSION_SUFFIXES:
        for path in package.rglob(f"*{suffix}"):
            # An extension module only replaces a module whose source sits beside it.
            source = path.with_name(path.name[: -len(suffix)] + ".py")
            if source.is_file():
                parts = source.relative_to(package.parent).with_suffix("").parts
                found.add(".".join(parts))
    return tuple(sorted(found))


_COMPILED = _find()


def compiled_modules() -> tuple[str, ...]:
    """The package's modules that run compiled, by dotted name (empty in the pure build)."""
    return _COMPILED


compiled: bool = bool(_COMPILED)


def build_name() -> str:
    if not _COMPILED:
        return "pure Python"
    return f"compiled with mypyc: {len(_COMPILED)} modules"
