#!/usr/bin/env bash
# Set up .venv (scripts/env.sh), check the import contracts (layers; stages never import
# stages: [tool.importlinter] in pyproject.toml) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
