#!/usr/bin/env bash
# Set up (if needed) and run the test suite (fast unit + oracle + integration tiers; slow tier: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
