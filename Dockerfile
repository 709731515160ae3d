# syntax=docker/dockerfile:1.7
# nextact images. One Dockerfile, two bases, three targets:
#
#   serve (default, last stage)  the HTTP service, `python -m app`; the artifact is mounted at /artifacts/current
#   serve-baked                  the same with an artifact copied in:
#                                  docker build --target serve-baked --build-context artifact=artifacts/demo .
#   trainer                      `python -m training train`; data mounted at /data, writes to the /artifacts volume
#
#   --build-arg BASE=cpu   (default) onnxruntime, from requirements/serve-cpu.txt
#   --build-arg BASE=cuda  onnxruntime-gpu with the CUDA runtime, cuBLAS, cuFFT, cuRAND and cuDNN as nvidia-*
#                          wheels, from requirements/serve-gpu.txt: the host needs only the NVIDIA driver and
#                          the NVIDIA Container Toolkit, so both flavours rest on the same slim Python image
#
# Every dependency is installed from the lock files in requirements/ (requirements/lock.sh writes them).
# All service configuration is NEXTACT_* environment (app/settings.py); the image only sets what the container
# layout decides (bind address, port, artifact and data paths, no embedded Redis).

ARG BASE=cpu
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base-cpu
ENV ORT_FLAVOUR=cpu

FROM ${PYTHON_IMAGE} AS base-cuda
ENV ORT_FLAVOUR=gpu

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

# The serving dependencies in /opt/venv (copied alone into the serving image), from the lock only, so that
# editing the source never invalidates the install layer.
FROM base AS serve-deps
COPY requirements/ /tmp/requirements/
RUN python3 -m venv /opt/venv \
 && pip install -r "/tmp/requirements/serve-${ORT_FLAVOUR}.txt"

# The serving image: no torch, no compilers, no embedded Redis server, non-root, one port.
FROM base AS runtime
COPY --from=serve-deps /opt/venv /opt/venv
COPY app/ ./app/
ENV NEXTACT_HOST=0.0.0.0 \
    NEXTACT_PORT=8000 \
    NEXTACT_ARTIFACT_DIR=/artifacts/current \
    NEXTACT_DATA_DIR=/var/lib/nextact \
    NEXTACT_EMBEDDED_REDIS=false
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NEXTACT_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "app"]

# The serving image with a model inside, for platforms without shared volumes.
FROM runtime AS serve-baked
COPY --from=artifact --chown=10001:10001 . /artifacts/current

# The trainer: torch from the PyTorch index (CPU wheels by default; cu130 for the GPU override), then the
# locked training dependencies (CPU ONNX Runtime: it only checks the export).
FROM base AS trainer
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/ /tmp/requirements/
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install -r /tmp/requirements/train-cpu.txt
COPY app/ ./app/
COPY training/ ./training/
# matplotlib (report plots) wants a writable config directory; the user has no home
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["train", "--data", "/data/events.csv", "--out", "/artifacts/current"]

# Default target: the serving image with the artifact mounted at run time.
FROM runtime AS serve
