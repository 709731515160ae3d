# syntax=docker/dockerfile:1.7
# nextact images. One Dockerfile, two bases, three targets:
#
#   serve (default, last stage)  the HTTP service, `python -m app`; the artifact is mounted at /artifacts/current
#   serve-baked                  the same with an artifact copied in:
#                                  docker build --target serve-baked --build-context artifact=artifacts/demo .
#   trainer                      `python -m training train`; data mounted at /data, writes to the /artifacts volume
#
#   --build-arg BASE=cpu   (default) python slim + onnxruntime
#   --build-arg BASE=cuda  nvidia/cuda runtime + cuDNN 9 + onnxruntime-gpu (1.31 is built against CUDA 13, cuDNN 9)
#
# All service configuration is NEXTACT_* environment (app/settings.py); the image only sets what the container
# layout decides (bind address, port, artifact and data paths).

ARG BASE=cpu
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
ENV ORT_PACKAGE=onnxruntime

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's Python 3.12; no compilers, only the interpreter and venv.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV ORT_PACKAGE=onnxruntime-gpu

# What every stage shares: a venv on PATH, an unprivileged user, the work directory.
FROM base-${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /srv/nextact nextact \
 && mkdir -p /srv/nextact /artifacts /var/lib/nextact \
 && chown nextact:nextact /artifacts /var/lib/nextact
WORKDIR /srv/nextact

# Requirement lists from pyproject.toml alone, so that editing the source never invalidates the installs.
FROM base AS requirements
ARG ORT_VERSION=1.31.1
COPY pyproject.toml ./
RUN python3 - <<'EOF'
import os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
ort = f"{os.environ['ORT_PACKAGE']}=={os.environ['ORT_VERSION']}"
serve = [r for r in project["dependencies"] if not r.startswith("onnxruntime")] + [ort]
train = serve + project["optional-dependencies"]["train"]
os.makedirs("/requirements", exist_ok=True)
open("/requirements/serve.txt", "w").write("\n".join(serve) + "\n")
open("/requirements/train.txt", "w").write("\n".join(train) + "\n")
EOF

# The serving dependencies in /opt/venv (copied alone into the serving image).
FROM base AS serve-deps
COPY --from=requirements /requirements/serve.txt /tmp/serve.txt
RUN python3 -m venv /opt/venv \
 && pip install -r /tmp/serve.txt

# The serving image: no torch, no compilers, non-root, one port.
FROM base AS runtime
COPY --from=serve-deps /opt/venv /opt/venv
COPY app/ ./app/
ENV NEXTACT_HOST=0.0.0.0 \
    NEXTACT_PORT=8000 \
    NEXTACT_ARTIFACT_DIR=/artifacts/current \
    NEXTACT_DATA_DIR=/var/lib/nextact
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NEXTACT_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "app"]

# The serving image with a model inside, for platforms without shared volumes.
FROM runtime AS serve-baked
COPY --from=artifact --chown=10001:10001 . /artifacts/current

# The trainer: torch from the PyTorch index (CPU wheels by default; cu130 for the GPU override).
FROM base AS trainer
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /requirements/train.txt /tmp/train.txt
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install -r /tmp/train.txt
COPY app/ ./app/
COPY training/ ./training/
# matplotlib (report plots) wants a writable config directory; the user has no home
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["train", "--data", "/data/events.csv", "--out", "/artifacts/current"]

# Default target: the serving image with the artifact mounted at run time.
FROM runtime AS serve
