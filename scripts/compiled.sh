#!/usr/bin/env bash
# The compiled build end to end: build the mypyc wheel (FIDELITY_MW_COMPILE=1), install it
# in a venv of its own (.venv-compiled, beside the editable .venv), and run the test suite
# against it. Arguments go to pytest, e.g. `bash scripts/compiled.sh -q -x`.
# Needs a C compiler and the Python headers; the pip build environment fetches mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=build/compiled-wheel
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)
# The switch is for this one build only: the tests build pure wheels of their own.
FIDELITY_MW_COMPILE=1 "$PY" -m pip wheel -q --no-deps -w "$out" .
wheel=$(ls "$out"/fidelity_mw-*.whl)
case "$wheel" in
  *-py3-none-any.whl) echo "compiled.sh: $wheel is a pure wheel: the build hook did not run" >&2; exit 1 ;;
esac
echo "compiled.sh: built $(basename "$wheel") in $(( $(date +%s) - start )) s"
if [ ! -x .venv-compiled/bin/python ]; then
  "$PY" -m venv .venv-compiled
fi
.venv-compiled/bin/python -m pip install -q "${wheel}[dev]"
# Same version number as any earlier build: replace it whatever pip thinks is installed.
.venv-compiled/bin/python -m pip install -q --no-deps --force-reinstall "$wheel"
echo "compiled.sh: $(.venv-compiled/bin/fidelity-mw --version)"
# The sources live under src/, which is not on this venv's path: `fidelity_mw` is the installed
# wheel (tests/test_compiled.py checks that each module listed in pyproject.toml runs compiled).
FIDELITY_MW_EXPECT_COMPILED=1 exec .venv-compiled/bin/python -m pytest -p no:cacheprovider "$@"
