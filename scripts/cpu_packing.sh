#!/usr/bin/env bash
# Packed against unpacked training at equal articles per optimizer step, on the CPU: the tiny recipe twice on the real
# holdout carve, once packed (its rows hold several articles) and once unpacked with as many articles per update as
# the packed run measured (per_device_train_batch_size x gradient_accumulation_steps). 17 minutes on 2 shared cores.
#   AG_NEWS_DIR=/data/ag_news scripts/cpu_packing.sh        # writes results/cpu_packing/
# Each run's training summary (optimizer_steps, articles_per_optimizer_step, train_seconds) and results JSON land in
# $OUT. A finished run is not trained again (delete checkpoints/cpu-packing-* to redo one).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/cpu_packing}
BATCH=16  # the tiny profile's per-device batch
mkdir -p "$OUT"
"$PY" -m data_prep.source  # no data: say how to supply it before training

run() {  # run NAME FLAGS...: train, keep the training summary, evaluate the final model
    local name=$1
    shift
    "$PY" -m finetune.train --profile tiny --run_name "$name" --results_dir "$OUT" "$@"
    cp "checkpoints/$name/final/train_summary.json" "$OUT/${name}_train_summary.json"
    "$PY" -m finetune.evaluate --profile tiny --run_name "$name" --results_dir "$OUT" "$@" \
        --model_path "checkpoints/$name/final" --name "$name"
}

run cpu-packing-true --packing true --per_device_train_batch_size "$BATCH"
accumulation=$("$PY" -c "import json, sys; s = json.load(open(sys.argv[1]))
print(max(1, round(s['articles_per_optimizer_step'] / $BATCH)))" "$OUT/cpu-packing-true_train_summary.json")
echo "packed: $(grep -o '"articles_per_optimizer_step": [0-9.]*' "$OUT/cpu-packing-true_train_summary.json");" \
     "unpacked: $BATCH x $accumulation articles per update"
run cpu-packing-false --packing false --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$accumulation"
