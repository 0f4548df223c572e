#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, train (or reuse) the demo teacher on
# the bundled Debian synopsis data, then run `dqtool compress recipes/demo.yaml`:
#   distill (3+3 -> 3+2 layers) -> qat (2-2-8 and 8-8-8, distilled) -> convert -> export -> bench
# (against the fp32 teacher, the layer-copied student and the peers), printing the report.
# Outputs go to runs/demo/; re-running reuses finished stages (manifests and hashes decide).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
mkdir -p runs/demo
start=$(date +%s)
if [ ! -f runs/demo/teacher/model.safetensors ]; then
  echo "== training the demo teacher (2600 fixed steps, ~4.5 min on 2 CPU cores; time reported, not enforced)"
  $PY benchmarks/teacher/train_teacher.py --size demo --out runs/demo/teacher
fi
echo "== dqtool compress recipes/demo.yaml"
.venv/bin/dqtool compress recipes/demo.yaml "$@"
echo "== main job done in $(( $(date +%s) - start )) s; report: runs/demo/compress/bench/bench.md (+ .json, .png)"
