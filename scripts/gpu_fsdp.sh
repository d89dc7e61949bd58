#!/usr/bin/env bash
# FSDP2 on one machine of several GPUs in one command (about 8 minutes on 2 GPUs): the 7B shape's per-GPU reference
# recipe on 1, 2, 4 ... GPUs (powers of two up to the machine's count, or GPUS="1 2"), a resume from a killed run, a
# final model that from_pretrained loads and finetune.evaluate scores, and the same for the 7B shape after 2 steps.
#   AG_NEWS_DIR=/data/ag_news PY=python3 OUT=/tmp/out scripts/gpu_fsdp.sh     # or: make PY=python3 gpu-fsdp
# Benchmark JSONs go to results/benchmarks/ (copied to $OUT too), logs and the evaluation to $OUT. Every step runs
# even if one before it failed; the last lines say which failed, and so does the exit status.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PY:-python3}
OUT=${OUT:-results/fsdp}
NAME=${NAME:-h200_7b_fsdp}
mkdir -p "$OUT" results/benchmarks
"$PY" -m data_prep.source || exit 1  # no data: say how to supply it, before any GPU time is spent
export NCCL_NVLS_ENABLE=0  # NVLink multicast off: the lent machines require it
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "$name: ok ($((SECONDS - start)) s)"
    else
        echo "$name: FAILED ($((SECONDS - start)) s), tail of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log"
        failed+=("$name")
    fi
}
launch=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes)

# 1. The reference recipe per GPU (packing, varlen, bf16 SR AdamW, batch 8 x 4, 512 tokens) with FSDP's activation
#    checkpointing: FSDP_VARIANTS[0] in finetune/lab/bench.py, 2 warm-up and 5 measured steps. On several GPUs also
#    FSDP_VARIANTS[4] (the weights re-gathered for every forward and backward, what [0] did before commit "FSDP2:
#    gather the weights once per optimizer step") and [2] (fp32 master weights, sharded).
gpus=$(nvidia-smi -L | wc -l)
GPUS=${GPUS:-$(n=1; while ((n <= gpus)); do printf '%d ' $n; n=$((n * 2)); done)}
benched=()  # this run's files only: a glob would also take the committed runs of other sets and GPU counts
for n in $GPUS; do
    variants=0,4,2
    ((n == 1)) && variants=0
    benched+=("results/benchmarks/${NAME}_${n}gpu.json")
    rm -f "${benched[-1]}"  # a failed step must not leave a committed file standing in for its result
    step "bench_${n}gpu" 300 "${launch[@]}" "$n" -m finetune.lab.bench train --profile qwen2.5-7b-shape --name "${NAME}_${n}gpu" \
        --variants $variants --dataloader_num_workers 2
done
cp "${benched[@]}" "$OUT"/ 2>/dev/null

# 2. Resume: the tiny recipe on 2 GPUs (fp32 master weights: FSDP2's mixed precision), sharded checkpoints every 100
#    steps. The run to 200 is the uninterrupted one; deleting what it wrote after step 100 leaves the disk as a kill
#    after that checkpoint would, and the same command then resumes from it.
tiny=(-m finetune.train --profile tiny --bf16 true --optimizer adamw_fp32_master --run_name fsdp-tiny
      --max_steps 200 --save_steps 100)
rm -rf checkpoints/fsdp-tiny
step tiny_uninterrupted 120 "${launch[@]}" 2 --fsdp_state_dict_type SHARDED_STATE_DICT "${tiny[@]}"
cp checkpoints/fsdp-tiny/final/train_summary.json "$OUT/uninterrupted_train_summary.json"
rm -rf checkpoints/fsdp-tiny/checkpoint-200 checkpoints/fsdp-tiny/final
step tiny_resumed 120 "${launch[@]}" 2 --fsdp_state_dict_type SHARDED_STATE_DICT "${tiny[@]}"
step resume_check 60 "$PY" - "$OUT/uninterrupted_train_summary.json" checkpoints/fsdp-tiny/final/train_summary.json <<'EOF'
import json, sys
straight, resumed = (json.load(open(path)) for path in sys.argv[1:])
assert resumed["resumed_from"].endswith("checkpoint-100"), resumed["resumed_from"]
losses = [{h["step"]: h["loss"] for h in s["log_history"] if "loss" in h} for s in (straight, resumed)]
assert losses[0].keys() == losses[1].keys(), "different logged steps"
worst = max(abs(losses[1][k] - v) / abs(v) for k, v in losses[0].items())
print(f"resumed from {resumed['resumed_from']}; largest relative loss difference over {len(losses[0])} logged "
      f"steps: {worst:.2e}")
assert worst < 0.02, "the resumed run left the uninterrupted loss curve"  # GPU kernels are not bit-deterministic
EOF
cat "$OUT/resume_check.log"

# 3. The FSDP2-trained model, saved by rank 0 from the gathered shards, through the suite's evaluation (one GPU).
step evaluate 120 "$PY" -m finetune.evaluate --profile tiny --bf16 true --optimizer adamw_fp32_master \
    --model_path checkpoints/fsdp-tiny/final --name fsdp-tiny --results_dir "$OUT"
grep -E "accuracy" "$OUT/evaluate.log"

# 4. (Left out with SKIP_7B_SAVE=1.) The 7B shape's end-of-run save on 2 GPUs: the shards gathered into plain safetensors by rank 0 (15 GB), loaded by
#    from_pretrained and evaluated on 200 articles; train_summary.json records final_save_seconds.
if [[ -z ${SKIP_7B_SAVE:-} ]]; then
    rm -rf checkpoints/fsdp-7b/*  # the folder may be a link (to /dev/shm, where the disk is small): keep it, empty it
    step save_7b 240 "${launch[@]}" 2 -m finetune.train --profile qwen2.5-7b-shape --run_name fsdp-7b --max_steps 2 \
        --gradient_checkpointing false --dataloader_num_workers 2
    cp checkpoints/fsdp-7b/final/train_summary.json "$OUT/fsdp-7b_train_summary.json"
    step evaluate_7b 180 "$PY" -m finetune.evaluate --profile qwen2.5-7b-shape --model_path checkpoints/fsdp-7b/final \
        --name fsdp-7b --max_eval_samples 200 --eval_batch_size 200 --results_dir "$OUT"
    rm -rf checkpoints/fsdp-7b/*
fi

"$PY" - "${benched[@]}" <<'EOF'
import json, sys
print(f"{'GPUs':>4} {'tokens/s/GPU':>12} {'MFU':>6} {'step s':>7} {'peak GiB':>8} {'epoch min':>9}")
for path in sys.argv[1:]:
    try:
        record = json.load(open(path))
    except FileNotFoundError:
        continue
    for name, v in record["variants"].items():
        if "error" in v:
            print(f"{record['world_size']:>4} {v['error']}  {name}")
            continue
        print(f"{record['world_size']:>4} {v['tokens_per_second']:>12,.0f} {v['mfu'] or 0:>6.1%} {v['step_seconds']:>7.2f} "
              f"{v['peak_allocated_gib'] or 0:>8.1f} {v['projected_epoch_minutes_full_train']:>9.1f}  {name}")
EOF
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
