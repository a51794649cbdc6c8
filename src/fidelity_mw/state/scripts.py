"""The Lua scripts as package data: each entry file with the shared library prepended."""

from __future__ import annotations

import hashlib
import importlib.resources
from typing import NamedTuple


class Script(NamedTuple):
    """One Lua entry script with the shared library prepended, and its SHA1."""

    name: str
    source: str
    sha: str


def load_script(name: str) -> Script:
    """Read `lua/lib.lua` + `lua/<name>.lua` from the package (works from a wheel)."""
    lua = importlib.resources.files("fidelity_mw.state").joinpath("lua")
    lib = lua.joinpath("lib.lua").read_text(encoding="utf-8")
    entry = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    source = f"{lib}\n-- ---- {name}.lua\n{entry}"
    return Script(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())
