#!/usr/bin/env bash
# nextact's one entry point for people and CI.
#   ./dev.sh serve      set up, train the demo model if there is none, start the service on http://127.0.0.1:8000
#   ./dev.sh test [pytest args]   set up and run the whole test suite
#   ./dev.sh bench      set up and run the benchmarks (bench/run.py)
#   ./dev.sh setup      only create/refresh the virtual environment
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NEXTACT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "nextact needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment in $VENV"
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.nextact-installed" want
    want=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-32)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing nextact and its dependencies into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch pinned to the CPU build for development and tests; the train extra alone would accept a CUDA build.
        "$VENV/bin/python" -m pip install -q "torch==2.13.0"
        "$VENV/bin/python" -m pip install -q -e ".[train,test,bench]"
        echo "$want" > "$stamp"
    fi
}

demo_model() {
    local dir=${NEXTACT_ARTIFACT_DIR:-artifacts/demo}
    if [ ! -f "$dir/manifest.json" ]; then
        echo "==> no model in $dir: training the demo model on examples/taobao_sample.csv"
        "$VENV/bin/python" -m training train --data examples/taobao_sample.csv --action-col behavior \
            --out "$dir" --epochs 8 --window 50
    fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    serve)
        setup
        demo_model
        exec "$VENV/bin/python" -m app "$@"
        ;;
    test)
        setup
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    *)
        sed -n '2,6p' "$0"
        exit 2
        ;;
esac
