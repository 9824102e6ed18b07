#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): Fashion-MNIST from Debian,
# a virtual environment in .venv with cmboost installed in editable mode.
# Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST not in /usr/share/datasets/fashion-mnist and no apt-get; use 'cmboost download-fmnist' or --data-dir" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.cmboost-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # torch and torchvision first, pinned to the builds this machine carries on disk.
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" \
        || .venv/bin/pip install -q "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
    .venv/bin/pip install -q -e ".[test,report]"
    touch "$stamp"
fi
