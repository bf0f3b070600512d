#!/usr/bin/env bash
# Set up (if needed) and run the test suite (fast unit + oracle + integration tiers; slow tier: -m slow).
# With no arguments it then runs the oracle tests that need a peer's venv in that venv, where the venv
# exists (benchmarks/setup_peers.sh makes them; .ci/run always does): .bench-venv (SAELens, tuned-lens)
# and .ct-venv (circuit-tracer). There a missing peer is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ "$#" -eq 0 ]; then
  if [ -x .bench-venv/bin/python ]; then
    FEATURELENS_STRICT_ORACLES=1 .bench-venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/oracle/test_saelens_roundtrip.py tests/oracle/test_tuned_lens_package.py
  fi
  if [ -x .ct-venv/bin/python ]; then
    FEATURELENS_STRICT_ORACLES=1 .ct-venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/oracle/test_circuit_tracer_format.py tests/oracle/test_circuit_tracer_graph.py
  fi
fi
