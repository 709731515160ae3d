#!/usr/bin/env bash
# What `pip install .`, `pip install ".[cpu]"` and `pip install ".[gpu]"` resolve to on this machine, without
# installing or downloading any wheel (uv reads only the packages' metadata; a pip --dry-run would fetch the
# ~1.5 GB of CUDA wheels just to read theirs):
#   .       the service without an inference runtime, and no CUDA wheel
#   .[cpu]  onnxruntime, and no CUDA wheel
#   .[gpu]  onnxruntime-gpu plus the NVIDIA CUDA runtime, cuBLAS and cuDNN wheels (a host needs only the driver)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
for extra in "" cpu gpu; do
    "$UV" pip compile pyproject.toml ${extra:+--extra "$extra"} --python-platform x86_64-manylinux_2_28 \
        --python-version 3.11 --no-header --no-annotate --quiet |
    python3 -c '
import re, sys
extra = sys.argv[1]
target = f".[{extra}]" if extra else "."
names = sorted(re.split(r"[=<>;\[ ]", line, maxsplit=1)[0].lower() for line in sys.stdin if line[:1].isalnum())
cuda = [n for n in names if n.startswith("nvidia-") or n == "onnxruntime-gpu"]
if extra == "gpu":
    need = {"onnxruntime-gpu", "nvidia-cuda-runtime", "nvidia-cublas"}
    assert need <= set(names) and any(n.startswith("nvidia-cudnn") for n in names), f"{target}: {names}"
    assert "onnxruntime" not in names, f"{target} would install both ONNX Runtimes"
else:
    assert not cuda, f"pip install {target} would pull CUDA wheels: {cuda}"
    assert ("onnxruntime" in names) == (extra == "cpu"), f"{target}: {names}"
listed = ", ".join(cuda) or "none"
print(f"pip install {target}: {len(names)} packages, CUDA wheels: {listed}")
' "$extra"
done
