# syntax=docker/dockerfile:1
# Images for mcis; docker-compose.yml builds them. Targets:
#   cpu       the toolkit on CPU (torch CPU wheels, onnxruntime)        docker build --target cpu -t mcis:cpu .
#   gpu       the toolkit on CUDA 13 (torch cu130, onnxruntime-gpu)      docker build --target gpu -t mcis:gpu .
#   tracking  the MLflow server with the PostgreSQL driver              docker build --target tracking .
# MLFLOW_VERSION equals the pin in pyproject.toml: server and clients run the same MLflow.

ARG MLFLOW_VERSION=3.17.2
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- tracking: MLflow server only --------------------------------------------------------------
FROM python:3.11-slim-bookworm AS tracking
ARG MLFLOW_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# [auth]: Flask-WTF, without which `--app-name basic-auth` does not start
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9"
WORKDIR /mlflow
EXPOSE 5000

# ---- cpu: the toolkit on CPU -------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS cpu
ARG GIT_COMMIT=unknown
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    MCIS_GIT_COMMIT=${GIT_COMMIT}
# pydensecrf2 has no Linux wheel: it compiles from its sdist
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mcis_cli mcis_cli
# PyPI's torch is the CUDA build (5 GB); the PyTorch CPU index serves the same versions without CUDA
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu,postgres]"
COPY configs configs
COPY deploy deploy
CMD ["mcis", "--help"]

# ---- gpu: the toolkit on CUDA 13 + cuDNN 9 (what torch cu130 and onnxruntime-gpu 1.31 need) -------
FROM ${CUDA_IMAGE} AS gpu
ARG GIT_COMMIT=unknown
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MCIS_GIT_COMMIT=${GIT_COMMIT} \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH UV_PYTHON_INSTALL_DIR=/opt/python
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 ships Python 3.12; mcis needs 3.11, which uv installs as a standalone build
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv
RUN uv venv --python 3.11 /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mcis_cli mcis_cli
RUN uv pip install ".[gpu,postgres]"
COPY configs configs
COPY deploy deploy
CMD ["mcis", "--help"]
