#!/usr/bin/env bash
# nextact's one entry point for people and CI.
#   ./dev.sh serve [nextact serve options]   set up, train the demo model if there is none, serve on :8000
#   ./dev.sh test [pytest args]              set up and run the whole test suite
#   ./dev.sh bench [bench/run.py args]       set up and run the comparison table (bench/results/service.*)
#   ./dev.sh docs [mkdocs args]              set up and serve the docs site (mkdocs serve), or e.g. `docs build`
#   ./dev.sh setup                           only create/refresh the virtual environment (.venv)
# Environment: ORT_FLAVOUR=cpu|gpu (default: gpu when nvidia-smi finds a GPU), TORCH_INDEX_URL (where torch
# comes from; https://download.pytorch.org/whl/cpu for the CPU-only build), PYTHON, NEXTACT_VENV.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NEXTACT_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0

flavour() {
    if [ -n "${ORT_FLAVOUR:-}" ]; then
        echo "$ORT_FLAVOUR"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo gpu  # an NVIDIA driver answers: onnxruntime-gpu with the CUDA libraries as pip packages
    else
        echo cpu
    fi
}

setup() {
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "nextact needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    local ort other stamp want
    ort=$(flavour)
    case "$ort" in
        cpu) other=onnxruntime-gpu ;;
        gpu) other=onnxruntime ;;
        *) echo "ORT_FLAVOUR must be cpu or gpu, not '$ort'" >&2; exit 2 ;;
    esac
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment in $VENV"
        "$PY" -m venv "$VENV"
    fi
    stamp="$VENV/.nextact-installed"
    want=$( (cat pyproject.toml clients/python/pyproject.toml dev.sh "requirements/dev-$ort.txt"; echo "$ort ${TORCH_INDEX_URL:-}") | sha256sum | cut -c1-32)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing nextact ($ort ONNX Runtime) and its locked dependencies into $VENV"
        local pip=("$VENV/bin/python" -m pip)
        "${pip[@]}" install -q --upgrade pip
        # torch first, from TORCH_INDEX_URL when set: plain PyPI serves the CUDA build on Linux x86-64
        "${pip[@]}" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
        # onnxruntime and onnxruntime-gpu are one import package: never both in one environment
        "${pip[@]}" uninstall -q -y "$other" 2>/dev/null || true
        "${pip[@]}" install -q -r "requirements/dev-$ort.txt"
        # setuptools' build warnings about editable installs go to a log, shown only if the install fails
        "${pip[@]}" install -q --no-deps -e . -e clients/python > "$VENV/editable-install.log" 2>&1 ||
            { cat "$VENV/editable-install.log" >&2; exit 1; }
        echo "$want" > "$stamp"
    fi
}

demo_model() {
    local dir=${NEXTACT_ARTIFACT_DIR:-artifacts/demo}
    if [ ! -f "$dir/manifest.json" ]; then
        echo "==> no model in $dir: training the demo model on examples/taobao_sample.csv (a few minutes)"
        mkdir -p "$(dirname "$dir")"
        # the result JSON (~150 lines) goes to a file; progress stays on the terminal
        "$VENV/bin/nextact" train --data examples/taobao_sample.csv --action-col behavior \
            --out "$dir" --epochs 8 --window 50 > "$dir.train.json"
        "$VENV/bin/python" - "$dir.train.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
hr = r["metrics"].get("full", {}).get("model", {}).get("hr@1")
score = f", test HR@1 {hr:.3f}" if hr is not None else ""
print(f"==> trained model {r['model_version']} into {r['artifact']} ({r['vocabulary']} tokens{score}); "
      f"the full result is in {sys.argv[1]}, the report in {r['artifact']}/report.md")
EOF
    fi
}

browser() {
    # the /ui tests drive a real headless Chromium (Debian's package); install it where we can
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing Chromium for the /ui tests (apt-get install chromium)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
            echo "    could not install Chromium: the /ui browser tests will be skipped" >&2
    fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    serve)
        setup
        case " $* " in
            *" --help "* | *" -h "* | *" --artifact-dir"*) ;;  # the caller names the model: no demo
            *) demo_model ;;
        esac
        exec "$VENV/bin/nextact" serve "$@"
        ;;
    test)
        setup
        browser
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    docs)
        setup
        if [ $# -eq 0 ]; then set -- serve; fi
        NO_MKDOCS_2_WARNING=1 exec "$VENV/bin/python" -m mkdocs "$@"
        ;;
    *)
        sed -n '2,9p' "$0"
        exit 2
        ;;
esac
