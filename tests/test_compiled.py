"""The opt-in mypyc build: off by default, and when on, really on.

The suite runs twice in CI: on the sources (pure Python), and on the compiled wheel
installed in a venv of its own (scripts/compiled.sh sets FIDELITY_MW_EXPECT_COMPILED=1
there). The same tests hold in both; this file checks that each run is the build it says.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import fidelity_mw
from fidelity_mw import buildinfo

ROOT = Path(__file__).resolve().parents[1]
EXPECT_COMPILED = os.environ.get("FIDELITY_MW_EXPECT_COMPILED") == "1"


def listed_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules: list[str] = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"][
        "compile"
    ]
    return modules


def _env_without_switch() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FIDELITY_MW_COMPILE", None)
    return env


def test_this_run_is_the_build_it_claims() -> None:
    listed = listed_modules()
    assert listed, "pyproject.toml lists the modules to compile"
    if EXPECT_COMPILED:
        assert fidelity_mw.compiled is True
        assert set(buildinfo.compiled_modules()) == set(listed)
        for name in listed:
            module = importlib.import_module(name)
            assert module.__file__ is not None
            assert module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), module.__file__
    else:
        # A stray extension module in src/ would silently shadow its source here.
        assert fidelity_mw.compiled is False
        assert buildinfo.compiled_modules() == ()
        for name in listed:
            module = importlib.import_module(name)
            assert module.__file__ is not None
            assert module.__file__.endswith(".py"), module.__file__


def test_every_listed_module_exists() -> None:
    for name in listed_modules():
        assert (ROOT / "src" / Path(*name.split("."))).with_suffix(".py").is_file(), name


def test_the_build_is_reported() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fidelity_mw.tools.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == f"fidelity-mw {fidelity_mw.__version__} ({buildinfo.build_name()})"
    if EXPECT_COMPILED:
        assert f"compiled with mypyc: {len(listed_modules())} modules" in out
    else:
        assert "pure Python" in out


def test_no_build_needs_mypy_extensions_at_run_time() -> None:
    # mypy_extensions blocked: the compiled modules (or their sources) and the classes
    # that carry mypyc's marker still import, subclass and run.
    code = (
        "import sys\n"
        "sys.modules['mypy_extensions'] = None\n"
        "import importlib, json\n"
        f"names = {listed_modules()!r}\n"
        "for name in names: importlib.import_module(name)\n"
        "from fidelity_mw.state.local import GcraTable\n"
        "from fidelity_mw.state.memory import MemoryStore\n"
        "class Spy(GcraTable):\n"
        "    swept = 0\n"
        "    def make_room(self, now, incoming=1):\n"
        "        Spy.swept += 1\n"
        "        super().make_room(now, incoming)\n"
        "store = MemoryStore(max_keys=1)\n"
        "store.limits = Spy(1)\n"
        "from fidelity_mw.state.base import LimitSpec\n"
        "spec = LimitSpec('l', 1.0, 1.0, 1, False)\n"
        "store.admit_now(None, None, ['a'], [spec], 0.0)\n"
        "store.admit_now(None, None, ['b'], [spec], 0.0)\n"
        "import fidelity_mw\n"
        "print(json.dumps([fidelity_mw.compiled, Spy.swept >= 1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == [EXPECT_COMPILED, True]


def _requires(env: dict[str, str]) -> list[str]:
    code = (
        "import json\n"
        "from hatchling.build import get_requires_for_build_wheel, get_requires_for_build_sdist\n"
        "print(json.dumps([get_requires_for_build_wheel(), get_requires_for_build_sdist()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    wheel, sdist = json.loads(out)
    assert sdist == []
    return list(wheel)


def test_the_compiler_is_asked_for_only_behind_the_switch() -> None:
    # What pip installs into the build environment (PEP 517's get_requires_for_build_wheel).
    assert _requires(_env_without_switch()) == []
    wanted = _requires({**_env_without_switch(), "FIDELITY_MW_COMPILE": "1"})
    assert any(r.startswith("mypy==") for r in wanted)
    assert any(r.startswith("starlette") for r in wanted)  # mypy needs the real types


def test_default_wheel_and_sdist_are_pure(tmp_path: Path) -> None:
    hatchling = Path(sys.executable).with_name("hatchling")
    subprocess.run(
        [str(hatchling), "build", "-d", str(tmp_path)],
        cwd=ROOT,
        env=_env_without_switch(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fidelity_mw/context.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    # the sdist can build the compiled wheel too
    assert {"hatch_build.py", "pyproject.toml", "src/fidelity_mw/_mypyc.py"} <= members


@pytest.mark.skipif(not EXPECT_COMPILED, reason="the compiled run only")
def test_compiled_wheel_keeps_the_sources() -> None:
    # The .py files stay beside the extension modules: tracebacks, inspect, the fallback.
    for name in listed_modules():
        module = importlib.import_module(name)
        assert module.__file__ is not None
        base = module.__file__
        for suffix in EXTENSION_SUFFIXES:
            base = base.removesuffix(suffix)
        assert Path(base + ".py").is_file(), base


def test_benchmark_pairs_each_build_with_its_own_bare_route() -> None:
    from argparse import Namespace

    from benchmarks.compiled import report

    def rnd(bare: float, fidelity: float) -> dict[str, float]:
        return {"bare": bare, "handwritten": bare + 1e-6, "fidelity": fidelity}

    # Drift moves both variants of a round together; the paired overheads do not move.
    samples = {
        "pure": [rnd(10e-6, 30e-6), rnd(20e-6, 40e-6), rnd(12e-6, 32e-6)],
        "compiled": [rnd(10e-6, 20e-6), rnd(20e-6, 30e-6), rnd(12e-6, 22e-6)],
    }
    text = report(samples, Namespace(rounds=3, batch=1, cpu_time=True))
    assert "| pure | 12.00 | 32.00 | +20.00 µs | 2.667 | 20.0 |" in text
    assert "| compiled | 12.00 | 22.00 | +10.00 µs | 1.833 | 10.0 |" in text
    assert "compiled overhead / pure overhead: 0.500" in text
