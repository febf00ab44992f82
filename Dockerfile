# syntax=docker/dockerfile:1
# Two images of lorapipe with its dependencies, set up by the Makefile's own `make setup`:
#
#   docker build -t lorapipe .                       # `cpu`, the last target: docker run --rm lorapipe = quickstart
#   docker build --target cuda -t <your-registry>/lorapipe:cuda .     # <your-registry> is a placeholder
#
# Each is also a ZenML parent image (configs/stacks/README.md): on a remote stack ZenML builds its image on top with
# the stack's packages, and each run's code reaches the pods through the artifact store (ZenML uploads it, and the
# pods import that copy ahead of the one in this image), so a code change needs no new image.
# torch goes in first, pinned as the Makefile's TORCH_SPEC (tests/test_stacks.py checks both pins), so nothing
# installed later swaps its build. The pip cache is a BuildKit cache mount: fast rebuilds, not part of the image.

# ---------------------------------------------------------------------------------------------------------- cuda
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS cuda

# Ubuntu 24.04's Python is 3.12 (pyproject allows 3.10-3.12). gcc and the Python headers are for Triton, which
# compiles unsloth's kernels when they first run.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The venv comes first on PATH, so `python`/`pip` here, in ZenML's layer on top and in its step pods are the venv's.
ENV VIRTUAL_ENV=/app/.venv PATH=/app/.venv/bin:$PATH ZENML_ANALYTICS_OPT_IN=false

# PyPI's Linux x86_64 torch wheel is a CUDA build that brings its own CUDA libraries; the GPU nodes' driver must
# support its CUDA version. For another CUDA version: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv .venv && pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"

COPY . .
# The torch constraint file only pins torch's version (2.13.0), so it keeps this CUDA build in place as well.
# unsloth and bitsandbytes come from pyproject's `cuda` extra, at its pins.
RUN --mount=type=cache,target=/root/.cache/pip \
    make setup EXTRAS=cuda,tracking,kubernetes TORCH_CONSTRAINTS=constraints/torch-cpu.txt \
    && mkdir -p /etc/lorapipe && pip list --format=freeze --exclude-editable > /etc/lorapipe/image-constraints.txt
# /etc/lorapipe/image-constraints.txt: every version installed here. The run configs pass it to the pip install in
# ZenML's layer, so the stack's packages (s3fs, gcsfs, ...) are resolved against this image, not upgraded over it.
CMD ["make", "quickstart"]

# ----------------------------------------------------------------------------------------------------------- cpu
FROM python:3.11-slim AS cpu

RUN apt-get update && apt-get install -y --no-install-recommends make git gcc g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV VIRTUAL_ENV=/app/.venv PATH=/app/.venv/bin:$PATH ZENML_ANALYTICS_OPT_IN=false

# The CPU wheel from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build); `make setup` then finds
# torch==2.13.0 installed and constraints/torch-cpu.txt keeps it through the rest of the install, as on a laptop.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv .venv && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    make setup EXTRAS=tracking,kubernetes TORCH_CONSTRAINTS=constraints/torch-cpu.txt && make tiny-model \
    && mkdir -p /etc/lorapipe && pip list --format=freeze --exclude-editable > /etc/lorapipe/image-constraints.txt
CMD ["make", "quickstart"]
