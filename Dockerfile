# syntax=docker/dockerfile:1
# Images for mcis; docker-compose.yml builds them. Targets:
#   cpu       the toolkit on CPU (torch CPU wheels, onnxruntime)        docker build --target cpu -t mcis:cpu .
#   gpu       the toolkit on CUDA 13 (torch cu130, onnxruntime-gpu)      docker build --target gpu -t mcis:gpu .
#   serve     a registered model over HTTP (`mlflow models serve`), without torch or mcis:
#             mlflow-skinny, onnxruntime-gpu (CUDA and cuDNN from pip; the CPU without a GPU),
#             numpy, pandas, Pillow                                     docker build --target serve -t mcis:serve .
#   tracking  the MLflow server with the PostgreSQL driver              docker build --target tracking .
# The toolkit images install their dependencies in a build stage, in a layer that only
# pyproject.toml changes, then the code; compilers stay in the build stage. Every image runs as
# an unprivileged user (uid MCIS_UID, 1000 by default: the usual owner of bind-mounted folders).
# MLFLOW_VERSION equals the pin in pyproject.toml: server, clients and served models run the same MLflow.

ARG MLFLOW_VERSION=3.17.2
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG MCIS_UID=1000

FROM ghcr.io/astral-sh/uv:0.9 AS uv

# ---- tracking: MLflow server only --------------------------------------------------------------
FROM python:3.11-slim-bookworm AS tracking
ARG MLFLOW_VERSION
ARG MCIS_UID
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# [auth]: Flask-WTF, without which `--app-name basic-auth` does not start
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" \
    && useradd --create-home --uid ${MCIS_UID} mlflow \
    && mkdir -p /mlflow/artifacts /mlflow/auth && chown -R mlflow /mlflow
WORKDIR /mlflow
USER mlflow
EXPOSE 5000

# ---- serve: the registered model's HTTP server, torch-free -------------------------------------
FROM python:3.11-slim-bookworm AS serve
ARG MLFLOW_VERSION
ARG MCIS_UID
# the served model's pin for export.serving=gpu; onnxruntime==1.32.0 builds a CPU-only image
ARG ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]==1.31.1"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# mlflow-skinny holds the scoring server (fastapi, uvicorn) without the tracking server's packages;
# the model brings its own code (mcis_cli/serving.py and what it imports)
RUN pip install "mlflow-skinny==${MLFLOW_VERSION}" "${ONNXRUNTIME}" "numpy==2.4.6" "pandas<3" "pillow>=11" \
    && useradd --create-home --uid ${MCIS_UID} mcis
WORKDIR /home/mcis
USER mcis
EXPOSE 8080

# ---- cpu: the toolkit on CPU -------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# pydensecrf2 has no Linux wheel: it compiles from its sdist, here and not in the image
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* && python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
# PyPI's torch is the CUDA build (5 GB); the PyTorch CPU index serves the same versions without CUDA
RUN python requirements.py pyproject.toml cpu postgres > requirements.txt \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY README.md ./
COPY mcis_cli mcis_cli
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm AS cpu
ARG MCIS_UID
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid ${MCIS_UID} mcis
COPY --from=cpu-build /opt/venv /opt/venv
WORKDIR /app
RUN --mount=from=cpu-build,source=/wheels,target=/wheels pip install --no-deps /wheels/*.whl \
    && mkdir runs && chown mcis runs
COPY configs configs
COPY deploy deploy
ARG GIT_COMMIT=unknown
ENV MCIS_GIT_COMMIT=${GIT_COMMIT}
USER mcis
CMD ["mcis", "--help"]

# ---- gpu: the toolkit on CUDA 13 + cuDNN 9 (what torch cu130 and onnxruntime-gpu 1.31 need) -------
FROM ${CUDA_IMAGE} AS gpu-build
ENV VIRTUAL_ENV=/opt/venv UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 UV_LINK_MODE=copy
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 ships Python 3.12; mcis needs 3.11, which uv installs as a standalone build
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv uv venv --python 3.11 /opt/venv
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    /opt/venv/bin/python requirements.py pyproject.toml gpu postgres > requirements.txt \
    && uv pip install -r requirements.txt
COPY README.md ./
COPY mcis_cli mcis_cli
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv uv build --wheel --out-dir /wheels .

FROM ${CUDA_IMAGE} AS gpu
ARG MCIS_UID
ENV PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH UV_NO_CACHE=1
# the base image's `ubuntu` user holds uid 1000
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) && useradd --create-home --uid ${MCIS_UID} mcis
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
WORKDIR /app
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv --mount=from=gpu-build,source=/wheels,target=/wheels \
    uv pip install --no-deps /wheels/*.whl \
    && mkdir runs && chown mcis runs
COPY configs configs
COPY deploy deploy
ARG GIT_COMMIT=unknown
ENV MCIS_GIT_COMMIT=${GIT_COMMIT} NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER mcis
CMD ["mcis", "--help"]
