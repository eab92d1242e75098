# syntax=docker/dockerfile:1
# One image for every meshserve role; the role is the command:
#   docker run meshserve:0.1.0 serve detector --host 0.0.0.0 --port 50051 ...
#   docker run meshserve:0.1.0 gateway --host 0.0.0.0 --port 50051 ...
#   docker run meshserve:0.1.0 train --quick
# CPU-only torch. Build (needs internet for PyPI and the PyTorch CPU wheel index):
#   docker build -t meshserve:0.1.0 .
# Pin the base by digest in your registry mirror: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:…

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: wheels into a venv
FROM ${PYTHON_IMAGE} AS build

# hnswlib ships as an sdist: it needs a C++ compiler, which stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/meshserve \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"

# torch first, from the CPU wheel index (no CUDA libraries: ~4x smaller image). Its own layer,
# so source changes do not re-download it. `torch==2.14.1` in pyproject matches `2.14.1+cpu`.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshserve/ meshserve/
COPY registry/ registry/
COPY servers/ servers/
COPY gateway/ gateway/
COPY training/ training/
# A regular (not editable) install: the runtime stage gets the venv and nothing of /src.
RUN pip install . \
    && python -c "import torch, meshserve.cli; assert torch.version.cuda is None, torch.version.cuda"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="meshserve" \
      org.opencontainers.image.description="gRPC model-serving mesh: every role by command"

ENV VIRTUAL_ENV=/opt/meshserve \
    PATH="/opt/meshserve/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MESHSERVE_HOME=/var/lib/meshserve

# A fixed numeric uid, so Kubernetes `runAsNonRoot` can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 meshserve \
    && useradd --system --uid 10001 --gid meshserve --home-dir /var/lib/meshserve \
       --shell /usr/sbin/nologin meshserve \
    && mkdir -p /var/lib/meshserve \
    && chown meshserve:meshserve /var/lib/meshserve

COPY --from=build /opt/meshserve /opt/meshserve

# Models, catalogue and shards: written by `train` / `shard build`, read by the servers.
VOLUME ["/var/lib/meshserve"]
WORKDIR /var/lib/meshserve
USER 10001:10001

# 50051: gRPC (Predict / PhotoSearch, health, reflection) by the convention of deploy/;
# 9464: Prometheus /metrics (--metrics-port).
EXPOSE 50051 9464

# With mTLS, mount the certificates (e.g. at /etc/meshserve/tls) and set MESHSERVE_TLS_CA, MESHSERVE_TLS_CERT,
# MESHSERVE_TLS_KEY: the server requires client certificates and this check presents its own (deploy/README.md).
# The gRPC health service of whatever role listens on 50051; roles on other ports, and the
# one-shot jobs (train, shard build), override or disable this in compose / Kubernetes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["meshserve", "health", "127.0.0.1:50051", "--timeout", "3"]

ENTRYPOINT ["meshserve"]
CMD ["--help"]
