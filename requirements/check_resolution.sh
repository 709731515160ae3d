#!/usr/bin/env bash
# What `pip install .` and `pip install ".[gpu]"` would install, resolved without installing (pip --dry-run
# reads the wheels' metadata files, so the ~3 GB of CUDA wheels are not downloaded):
#   .[cpu]  onnxruntime and no CUDA wheel at all
#   .[gpu]  onnxruntime-gpu plus the NVIDIA CUDA runtime and cuDNN wheels (a host needs only the driver)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for target in . ".[cpu]" ".[gpu]"; do
    "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$dir/report.json" "$target" 2>/dev/null
    "$PY" - "$dir/report.json" "$target" <<'PYEOF'
import json, sys
report, target = json.load(open(sys.argv[1])), sys.argv[2]
names = sorted(item["metadata"]["name"].lower().replace("_", "-") for item in report["install"])
cuda = [n for n in names if n.startswith("nvidia-") or n == "onnxruntime-gpu"]
if target == ".[gpu]":
    need = {"onnxruntime-gpu", "nvidia-cuda-runtime", "nvidia-cublas"}
    assert need <= set(names) and any(n.startswith("nvidia-cudnn") for n in names), f"{target}: {names}"
    assert "onnxruntime" not in names, f"{target} would install both ONNX Runtimes"
else:
    assert not cuda, f"pip install {target} would pull CUDA wheels: {cuda}"
    assert ("onnxruntime" in names) == (target == ".[cpu]"), f"{target}: {names}"
print(f"pip install {target}: {len(names)} packages, CUDA wheels: {', '.join(cuda) or 'none'}")
PYEOF
done
