#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, train (or reuse) the demo teacher
# on the bundled Debian synopsis data, then run the dqtool stages that exist:
#   distill (3+3 -> 2+1 layers) -> eval -> qat (2-2-8 with distillation) -> eval.
# Outputs go to runs/demo/ (override with DQTOOL_DEMO_DIR); re-running reuses finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
DQ=.venv/bin/dqtool
RUN=${DQTOOL_DEMO_DIR:-runs/demo}
DATA=dqtool/assets/data/debian_synopsis
STEPS=${DQTOOL_DEMO_QAT_STEPS:-300}
mkdir -p "$RUN"

if [ ! -f "$RUN/teacher/model.safetensors" ]; then
  echo "== training the demo teacher (<= 5 min on 2 CPU cores)"
  $PY benchmarks/teacher/train_teacher.py --size demo --out "$RUN/teacher"
fi
if [ ! -d "$RUN/student" ]; then
  echo "== dqtool distill"
  $DQ distill "$RUN/teacher" "$RUN/student" --encoder-layers 2 --decoder-layers 1
fi
echo "== dqtool eval: teacher and layer-copied student (test split, first 300 rows, greedy)"
$DQ eval "$RUN/teacher" --data "$DATA" --max-samples 300 --max-length 32 --batch-size 64 --out "$RUN/eval_teacher.json"
$DQ eval "$RUN/student" --data "$DATA" --max-samples 300 --max-length 32 --batch-size 64 --out "$RUN/eval_student.json"
if [ ! -d "$RUN/qat-2-2-8" ]; then
  echo "== dqtool qat 2-2-8 ($STEPS steps)"
  resume=""; [ -d "$RUN/qat-2-2-8.partial" ] && resume="--resume"
  $DQ qat "$RUN/student" "$RUN/qat-2-2-8" --data "$DATA" --wea 2-2-8 --max-steps "$STEPS" --batch-size 16 \
    --lr 5e-4 --source-max-length 128 --target-max-length 32 --save-steps 100 $resume
fi
echo "== dqtool eval: 2-2-8 QAT student"
$DQ eval "$RUN/qat-2-2-8" --data "$DATA" --max-samples 300 --max-length 32 --batch-size 64 --out "$RUN/eval_qat-2-2-8.json"
