#!/usr/bin/env bash
# Regenerate the lock files in requirements/ from pyproject.toml (uv: `pip install uv`).
#
#   requirements/lock.sh            update the locks, keeping every pin that still satisfies pyproject.toml
#   requirements/lock.sh --upgrade  move every pin to the newest release allowed
#   requirements/lock.sh --check    fail if a lock is out of date with pyproject.toml (CI)
#
# Each lock is universal (markers for every platform, Python 3.11+). torch is left out of every lock: it
# comes from the PyTorch index that matches the machine (CPU or a CUDA version), installed before the lock
# (dev.sh, Dockerfile's trainer stage); its own dependencies then come with it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
mode=${1:-}
overrides=$(mktemp) constraints=$(mktemp)
trap 'rm -f "$overrides" "$constraints"' EXIT
echo "torch ; sys_platform == 'never'" > "$overrides"   # an override whose marker never holds drops torch

declare -A LOCKS=(
    [serve-cpu]="--extra cpu"
    [serve-gpu]="--extra gpu"
    [train-cpu]="--extra cpu --extra train"
    [dev-cpu]="--extra cpu --extra embedded --extra train --extra test --extra bench --extra docs"
    [dev-gpu]="--extra gpu --extra embedded --extra train --extra test --extra bench --extra docs"
)
status=0
# serve-gpu first; every other lock is constrained by it, with onnxruntime at onnxruntime-gpu's version, so
# that all five agree on every package they share and the CPU and GPU images run the same ONNX Runtime.
for name in serve-gpu serve-cpu train-cpu dev-cpu dev-gpu; do
    out=requirements/$name.txt
    target=$out
    if [ "$mode" = "--check" ]; then
        target=$(mktemp)
        cp "$out" "$target"
    fi
    # shellcheck disable=SC2086
    "$UV" pip compile pyproject.toml ${LOCKS[$name]} --universal --python-version 3.11 \
        --override "$overrides" --no-emit-package torch --no-annotate --quiet --no-header --output-file "$target" \
        $([ "$name" != serve-gpu ] && echo --constraint "$constraints") \
        $([ "$mode" = "--upgrade" ] && echo --upgrade)
    # drop what only torch needs (its override's marker never holds; pip would skip these lines anyway)
    sed -i "/sys_platform == 'never'/d" "$target"
    if [ "$mode" = "--check" ]; then
        if ! cmp -s "$out" "$target"; then
            diff -u "$out" "$target" | head -40 || true
            echo "$out is out of date with pyproject.toml: run requirements/lock.sh" >&2
            status=1
        fi
        rm -f "$target"
    fi
    if [ "$name" = serve-gpu ]; then
        grep -E '^[a-z0-9]' "$out" > "$constraints"  # the pins, markers and all
        sed -n 's/^onnxruntime-gpu==\([^ ;]*\).*/onnxruntime==\1/p' "$out" >> "$constraints"
    fi
done
exit $status
