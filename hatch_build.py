"""Opt-in mypyc build of the hot modules (FIDELITY_MW_COMPILE=1).

Without the switch this hook does nothing and asks for nothing: the default wheel, the
sdist and editable installs stay pure Python and need neither a compiler nor mypy.

With it, `pip wheel .` compiles the modules listed under `compile` in pyproject.toml
with mypyc and ships the extension modules beside the unchanged .py files, so the
wheel is a platform wheel whose .py files still serve tracebacks and tools. The C
build happens in a temporary directory: nothing compiled lands in src/, where it would
shadow the sources of an editable install in the same checkout.

We use mypyc's own build API rather than the hatch-mypyc plugin: that plugin builds in
place (the .so files appear next to the sources) and renames pyproject.toml while it
runs, both of which break a working checkout that tests run from.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SWITCH = "FIDELITY_MW_COMPILE"
# The compiler: mypyc ships inside mypy. The build pins the version it was proven with,
# because what mypyc accepts and emits changes between releases.
COMPILER = ["mypy==2.4.1", "setuptools>=70"]
# mypy must see the real types of what the compiled modules import (strict mode fails
# on a missing library); these are the extras whose modules src/ imports.
TYPE_EXTRAS = ("redis", "otel", "prometheus")


def _enabled() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in {"1", "true", "yes", "on"}


class CompileHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def dependencies(self) -> list[str]:
        if not _enabled():
            return []
        deps = list(COMPILER)
        deps += self.metadata.core.dependencies
        optional = self.metadata.core.optional_dependencies
        for extra in TYPE_EXTRAS:
            deps += [d for d in optional.get(extra, []) if "fidelity-mw" not in d]
        return deps

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        # An editable install always runs the sources: a compiled copy there would be stale
        # at the next edit.
        if self.target_name != "wheel" or version == "editable" or not _enabled():
            return
        modules = self.config.get("compile", [])
        if not modules or not all(isinstance(m, str) for m in modules):
            raise ValueError("tool.hatch.build.targets.wheel.hooks.custom.compile: list modules")
        root = Path(self.root)
        paths = [str(Path("src", *m.split("."))) + ".py" for m in modules]
        for path in paths:
            if not (root / path).is_file():
                raise FileNotFoundError(f"{SWITCH}: {path} (listed under compile) does not exist")
        out = Path(tempfile.mkdtemp(prefix="fidelity-mypyc-out-"))
        self._out = out
        try:
            built = _compile(root, paths, out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # finalize() never runs after a failure
            raise
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for so in built:
            build_data["force_include"][str(so)] = str(so.relative_to(out))

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        out = getattr(self, "_out", None)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


def _compile(root: Path, paths: list[str], out: Path) -> list[Path]:
    """mypyc + setuptools' build_ext into `out`; returns the extension modules built."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    with tempfile.TemporaryDirectory(prefix="fidelity-mypyc-") as tmp:
        cwd = Path.cwd()
        # mypy reads [tool.mypy] (strict) from the project and resolves src/ paths from here.
        os.chdir(root)
        try:
            extensions = mypycify(
                # Only the compiled modules are checked here (CI checks all of src/ with the
                # dev tools): the modules they import that need a dev-only library (the
                # OTel configuration loader, say) must not fail the build.
                [f"--cache-dir={tmp}/mypy-cache", "--follow-imports=silent", *paths],
                opt_level="3",
                target_dir=f"{tmp}/c",
            )
            dist = Distribution({"name": "fidelity_mw_mypyc", "ext_modules": extensions})
            build_ext = dist.get_command_obj("build_ext")
            build_ext.build_lib = str(out)  # type: ignore[attr-defined]
            build_ext.build_temp = f"{tmp}/obj"  # type: ignore[attr-defined]
            build_ext.parallel = os.cpu_count() or 1  # type: ignore[attr-defined]
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    built = sorted(p for p in out.rglob(f"*{suffix}"))
    # Each source by name: mypyc also builds one shared library, so a count would let one
    # missing module through.
    names = {(p.parent.relative_to(out), p.name.split(".")[0]) for p in built}
    missing = [
        path
        for path in paths
        if (Path(path).parent.relative_to("src"), Path(path).stem) not in names
    ]
    if missing:
        raise RuntimeError(f"mypyc built no extension module for {', '.join(missing)}")
    return built
