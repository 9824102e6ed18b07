#!/usr/bin/env bash
# The Fashion-MNIST recipe at GPU scale (the GPU profile of recipes/fmnist.sh): the EDM teacher, CT and
# CD with bf16 and batches of 256-512 on a UNet sized for the budget, then training samples, a joint
# network, and a check of the new generators against the shipped CPU ones (FID under the tuning judge).
#
#   RUNS=runs-gpu bash recipes/fmnist-gpu.sh            # one GPU, BUDGET_S seconds in all (default 270)
#   SMOKE=1 RUNS=/tmp/fm bash recipes/fmnist-gpu.sh      # toy sizes on the CPU: checks every command (~1 min)
#   DATA_DIR=.gpu-carry/fashion-mnist ...                # where the four idx .gz files are (else the system copy)
#
# `train-cm` has no time-budget flag, so each stage has a fixed iteration count (EDM_ITERS, CT_ITERS,
# CD_ITERS, JCD_ITERS; defaults sized for about 4.5 minutes of one H200, an estimate: no GPU has run
# this yet) AND a wall-clock share of BUDGET_S enforced with `timeout`. A stage stopped by its share
# keeps what it saved: train-cm exports model.safetensors at every --save-every, and a stopped
# train-jcd is finished by a rerun with --iters set to the last logged iteration (resume is exact).
# Each stage prints one "fmnist-gpu: STAGE ..." line saying whether it finished or was stopped, and the
# logs (log.jsonl, sec_per_iter / images_per_s) show the speed to size the next run by.
#
# CT here is plain consistency training from scratch: train-cm has no ECT mode (CT initialised from the
# teacher); the teacher is used by CD only. EDM and CT train at the same time (they are independent and
# a small UNet does not fill the GPU). Seeds as in recipes/fmnist.sh: training 0, training samples
# 101-102, validation samples 201-204. The test split is not used.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs-gpu}
SMOKE=${SMOKE:-0}
if [ -z "${CMB:-}" ]; then
  if [ -x .venv/bin/cmboost ]; then CMB=.venv/bin/cmboost; else CMB="python3 -m cmboost"; fi
fi
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
HELD_OUT=$($PY -c "from cmboost.files.datasets import FMNIST_HELD_OUT_START as s; print(s)")  # train[HELD_OUT:] is held out
export TQDM_DISABLE=${TQDM_DISABLE:-1}   # no progress bars in the logs (tqdm >= 4.66 reads it)
DATA=()
[ -n "${DATA_DIR:-}" ] && DATA=(--data-dir "$DATA_DIR") && export CMBOOST_FMNIST_DIR="$DATA_DIR"

if [ "$SMOKE" = 1 ]; then   # toy sizes on the CPU: the same commands, seconds each
  DEVICE=${DEVICE:-cpu}; PREC=${PREC:-fp32}; BUDGET_S=${BUDGET_S:-150}
  UNET=(--model-channels 8 --channel-mult 1,2 --num-res-blocks 1 --attention-resolutions 8 --num-head-channels 8)
  EDM_ITERS=${EDM_ITERS:-2}; CT_ITERS=${CT_ITERS:-2}; CD_ITERS=${CD_ITERS:-2}; JCD_ITERS=${JCD_ITERS:-2}
  BATCH=${BATCH:-8}; CD_BATCH=${CD_BATCH:-8}; JCD_BATCH=${JCD_BATCH:-8}; JCD_WIDTH=${JCD_WIDTH:-8}
  SAVE_EVERY=1; TRAIN_NUM=${TRAIN_NUM:-32}; VAL_NUM=${VAL_NUM:-32}; SAMPLE_BATCH=32
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else                        # one GPU
  DEVICE=${DEVICE:-cuda}; PREC=${PREC:-bf16}; BUDGET_S=${BUDGET_S:-270}
  # 3.2M parameters (12 MiB exported in fp32, under the 16 MiB a returned file may have); one residual
  # block per level keeps the kernel count, and so the launch overhead of a small model, low.
  UNET=(--model-channels 48 --channel-mult 1,2,2 --num-res-blocks 1 --attention-resolutions 16,8 --num-head-channels 32)
  EDM_ITERS=${EDM_ITERS:-5000}; CT_ITERS=${CT_ITERS:-1500}; CD_ITERS=${CD_ITERS:-2000}; JCD_ITERS=${JCD_ITERS:-1200}
  BATCH=${BATCH:-512}; CD_BATCH=${CD_BATCH:-256}; JCD_BATCH=${JCD_BATCH:-256}; JCD_WIDTH=${JCD_WIDTH:-32}
  SAVE_EVERY=250; TRAIN_NUM=${TRAIN_NUM:-10000}; VAL_NUM=${VAL_NUM:-5000}; SAMPLE_BATCH=2500
fi
RUNTIME=(--device "$DEVICE" --precision "$PREC")
share() { echo $(( BUDGET_S * $1 / 100 )); }   # seconds: percent of BUDGET_S
mkdir -p "$RUNS"
stage=${1:-all}
want() { [ "$stage" = all ] || [ "$stage" = "$1" ]; }
say() { echo "fmnist-gpu: $*"; }

# budgeted NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS. Exit 0 when it finished or was
# stopped by its share (124, said so), the command's own status otherwise.
budgeted() {
  local name=$1 secs=$2 rc=0 start=$SECONDS
  shift 2
  # --foreground: stay in our process group, so that whoever stops this script (gpu_check) stops the stage too
  timeout --foreground -s TERM -k 10 "$secs" "$@" || rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    say "$name stopped by its time budget (${secs}s)"; return 0
  elif [ $rc != 0 ]; then
    say "$name failed (exit $rc)"; return $rc
  fi
  say "$name finished in $((SECONDS - start))s"
}

# iterations a train-cm run exported (read from the safetensors header, without loading torch)
iterations() { python3 -c "import json,struct,sys
f = open(sys.argv[1], 'rb'); head = json.loads(f.read(struct.unpack('<Q', f.read(8))[0]))
print(json.loads(head['__metadata__']['cmboost.info'])['iterations'])" "$1" 2>/dev/null || echo "?"; }

# 1. EDM teacher and CT at once, then CD from the teacher.
if want cm; then
  budgeted cm-edm "$(share 42)" $CMB train-cm --mode edm --data fmnist "${DATA[@]}" --run-dir "$RUNS/fmnist-edm" \
      --iters "$EDM_ITERS" --batch-size "$BATCH" --lr 1e-3 --warmup 200 "${UNET[@]}" --save-every "$SAVE_EVERY" \
      --log-every 50 --seed 0 --no-progress "${RUNTIME[@]}" &
  edm=$!
  budgeted cm-ct "$(share 42)" $CMB train-cm --mode ct --data fmnist "${DATA[@]}" --run-dir "$RUNS/fmnist-ct" \
      --iters "$CT_ITERS" --end-scales 160 --batch-size "$BATCH" --lr 5e-4 --warmup 200 "${UNET[@]}" \
      --save-every "$SAVE_EVERY" --log-every 50 --seed 0 --no-progress "${RUNTIME[@]}" &
  ct=$!
  wait $edm; wait $ct
  say "cm-edm at $(iterations "$RUNS/fmnist-edm/model.safetensors")/$EDM_ITERS iterations," \
      "cm-ct at $(iterations "$RUNS/fmnist-ct/model.safetensors")/$CT_ITERS"
fi
if want cd; then
  budgeted cm-cd "$(share 20)" $CMB train-cm --mode cd --teacher "$RUNS/fmnist-edm/model.safetensors" --data fmnist \
      "${DATA[@]}" --run-dir "$RUNS/fmnist-cd" --iters "$CD_ITERS" --batch-size "$CD_BATCH" --lr 1e-4 --warmup 100 \
      --save-every "$SAVE_EVERY" --log-every 50 --seed 0 --no-progress "${RUNTIME[@]}"
  say "cm-cd at $(iterations "$RUNS/fmnist-cd/model.safetensors")/$CD_ITERS iterations"
fi

# 2. Samples (1-step CT and CD) for the joint network, and validation samples for the check.
S="$RUNS/fmnist-samples"
mkdir -p "$S"
sample() {  # sample MODEL STEPS NUM SEED OUT
  [ -f "$5" ] || $CMB sample --model "$1" --steps "$2" --num "$3" --seed "$4" --batch-size "$SAMPLE_BATCH" \
      --no-progress --out "$5" "${RUNTIME[@]}"
}
if want samples; then
  start=$SECONDS; pids=()
  sample "$RUNS/fmnist-ct/model.safetensors" 1 "$TRAIN_NUM" 101 "$S/train-ct1.npz" & pids+=($!)
  sample "$RUNS/fmnist-cd/model.safetensors" 1 "$TRAIN_NUM" 102 "$S/train-cd1.npz" & pids+=($!)
  sample "$RUNS/fmnist-ct/model.safetensors" 1 "$VAL_NUM" 201 "$S/val-ct1.npz" & pids+=($!)
  if [ "$SMOKE" != 1 ]; then  # only the FID check reads these
    sample "$RUNS/fmnist-cd/model.safetensors" 1 "$VAL_NUM" 202 "$S/val-cd1.npz" & pids+=($!)
    sample cmboost/assets/fmnist/ct.safetensors 1 "$VAL_NUM" 201 "$S/val-shipped-ct1.npz" & pids+=($!)
    sample cmboost/assets/fmnist/cd.safetensors 1 "$VAL_NUM" 202 "$S/val-shipped-cd1.npz" & pids+=($!)
  fi
  [ -f "$S/heldout.npz" ] || $CMB export-data --data fmnist "${DATA[@]}" --split train --start "$HELD_OUT" --image-size 32 \
      --out "$S/heldout.npz" & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid"; done
  say "samples finished in $((SECONDS - start))s"
fi

# 3. The joint network: the recipe's attack settings (recipes/fmnist.sh stage jcd), wider and with
#    batches of 256 real + 256 generated.
J="$RUNS/fmnist-jcd-joint"
JCD=(train-jcd --data fmnist "${DATA[@]}" --image-size 32 --real-limit "$HELD_OUT" --generated "$S/train-ct1.npz"
     "$S/train-cd1.npz" --arch resnet_small --width "$JCD_WIDTH" --objective joint --batch-size "$JCD_BATCH"
     --lr 3e-3 --milestones $((JCD_ITERS * 4 / 5)) --real-eps 0.5 --real-step-size 0.25 --gen-step-size 0.2
     --gen-steps 5 --gen-steps-every 0 --log-every 50 --ckpt-every 100 --seed 7 --run-dir "$J" "${RUNTIME[@]}")
if want jcd; then
  budgeted jcd "$(share 20)" $CMB "${JCD[@]}" --iters "$JCD_ITERS"
  if [ ! -f "$J/model.safetensors" ] && [ -f "$J/log.jsonl" ]; then   # stopped: export where it got to
    reached=$(tail -n 1 "$J/log.jsonl" | $PY -c "import json,sys; print(json.load(sys.stdin)['step'])")
    say "jcd: exporting at iteration $reached of $JCD_ITERS"
    $CMB "${JCD[@]}" --iters "$reached"
  fi
  tail -n 1 "$J/log.jsonl" || true
fi

# 4. The check: FID under the tuning judge (the shipped fmnist net) against the training split, for
#    the new and the shipped 1-step generators, and for the new CT samples boosted by the new joint
#    network (PGD, default settings, early stop at the held-out images' mean realness). Not on the
#    smoke run: the training-split reference alone takes minutes on a CPU.
C="$RUNS/fmnist-check"
mkdir -p "$C"
if want check; then
  start=$SECONDS
  [ -f "$C/boosted-ct1.npz" ] || $CMB boost "$S/val-ct1.npz" --model "$J/model.safetensors" --method pgd \
      --threshold-from "$S/heldout.npz" --batch-size "$SAMPLE_BATCH" --no-grid --out "$C/boosted-ct1.npz" \
      "${RUNTIME[@]}"
  if [ "$SMOKE" = 1 ]; then
    say "check: smoke run, boosting only (no FID)"
  else
    [ -f "$C/train-ref.npz" ] || $CMB evaluate-ref --data fmnist "${DATA[@]}" --split train --features fmnist \
        --out "$C/train-ref.npz" --device "$DEVICE" --quiet
    pids=()
    for name in ct1 cd1 shipped-ct1 shipped-cd1; do
      [ -f "$C/fid-$name.json" ] || $CMB evaluate "$S/val-$name.npz" --ref "$C/train-ref.npz" --features fmnist \
          --device "$DEVICE" --quiet --json "$C/fid-$name.json" > /dev/null & pids+=($!)
    done
    [ -f "$C/fid-boosted-ct1.json" ] || $CMB evaluate "$C/boosted-ct1.npz" --ref "$C/train-ref.npz" --features fmnist \
        --device "$DEVICE" --quiet --json "$C/fid-boosted-ct1.json" > /dev/null & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid"; done
    for f in "$C"/fid-*.json; do
      $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print('fmnist-gpu:', sys.argv[1].split('/')[-1][4:-5], 'FID', r.get('fid'))" "$f" || true
    done
  fi
  say "check finished in $((SECONDS - start))s"
fi
