#!/usr/bin/env bash
# One prepared GPU run: the environment, the CUDA tests, the four benchmarks and the Fashion-MNIST
# models at GPU scale, in one command with one time budget (benchmarks/README.md says how to launch it).
#
#   bash benchmarks/gpu_check.sh --out "$OUT"          # on the GPU machine (--budget-s 540 by default)
#   bash benchmarks/gpu_check.sh --smoke --out tmp     # every part at toy sizes on the CPU
#   bash benchmarks/gpu_check.sh --help                # the flags (--parts, --data-dir, --work-dir, ...)
#
# Wheels carried in .gpu-carry/whl/ or .whl/ (benchmarks/prepare_gpu_carry.sh puts torch-fidelity
# there) are installed first into a private folder put on PYTHONPATH; the machine's own packages are
# left alone. The Python is $PYTHON, else the checkout's .venv, else python3 (the GPU machine's).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

wheels=()
site=""
declare -A seen=()
for dir in .gpu-carry/whl .whl; do
  for wheel in "$dir"/*.whl; do
    [ -f "$wheel" ] || continue
    name=$(basename "$wheel")
    [ -n "${seen[$name]:-}" ] && continue   # one copy of each: two stop the whole install
    seen[$name]=1
    wheels+=("$wheel")
  done
done
if [ ${#wheels[@]} -gt 0 ]; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check-site.XXXXXX")
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    GPU_CHECK_WHEELS="$(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')"
    export GPU_CHECK_WHEELS
    echo "gpu_check.sh: installed $GPU_CHECK_WHEELS into $site"
  else
    echo "gpu_check.sh: installing ${wheels[*]} failed; going on without them" >&2
  fi
fi
"$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ -n "$site" ] && rm -rf "$site"
exit $rc
