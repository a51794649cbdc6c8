#!/usr/bin/env bash
# Set up and run the main demo on the embedded (in-memory) default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fidelity-mw demo "$@"
