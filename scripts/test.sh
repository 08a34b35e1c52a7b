#!/usr/bin/env bash
# The test command of the README and of CI: set up, then the whole suite (pytest arguments pass
# through, e.g. `bash scripts/test.sh -m "not distributed"` for the quick set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
