#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# torch goes in first: here `torch==2.13.0` is a CPU build on local disk, whereas an
# unpinned torch would pull a multi-GB CUDA build. Elsewhere set DQTOOL_TORCH to any
# torch>=2.4 requirement (e.g. DQTOOL_TORCH="torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${DQTOOL_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
# The project and its extras; torch already satisfies torch>=2.4, so nothing is re-downloaded.
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import dqtool, torch; print(f'dqtool {dqtool.__version__}, torch {torch.__version__}')"
