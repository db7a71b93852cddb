# syntax=docker/dockerfile:1
# Images built from this file (the default target is the last stage, the gateway):
#   docker build -t llm-gateway .                                 # the gateway
#   docker build --target fetcher -t llm-gateway-fetcher .        # fetch-then-serve init step
# The gateway runs as a non-root user from a slim, pinned base with no compiler, pip cache or
# source tree in it, and is configured only by GATEWAY_* environment variables or a mounted
# config file (`serve --config /etc/llm-gateway/gateway.yaml`). See docs/deploy.md.
# Pin the base by digest at release time as well: PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- build: the gateway's venv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A non-editable install: the final image gets site-packages, not the source tree.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile . \
 && /opt/venv/bin/python -m compileall -q /opt/venv \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# ---------------------------------------------------------------- fetcher: weights to disk
FROM ${PYTHON_IMAGE} AS fetcher-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/fetcher/requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/fetch \
 && /opt/fetch/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
 && /opt/fetch/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE} AS fetcher
LABEL org.opencontainers.image.title="llm-gateway-fetcher" \
      org.opencontainers.image.description="Fetches model weights to local disk before vLLM starts"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=fetcher-build /opt/fetch /opt/fetch
COPY --chmod=0755 deploy/fetch_model.py /usr/local/bin/fetch-model
# A fresh Docker named volume mounted on /models starts with this ownership: no root needed.
RUN mkdir /models && chown 10001:10001 /models
# The user has no home directory: the hf / aws CLIs keep their small state under /tmp.
ENV PATH=/opt/fetch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf-home \
    HF_HUB_DISABLE_TELEMETRY=1
USER 10001:10001
# Exits 0 when the destination holds a complete model; see the exit codes in the script.
ENTRYPOINT ["fetch-model"]

# ---------------------------------------------------------------- the gateway (default target)
FROM ${PYTHON_IMAGE} AS gateway
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="OpenAI-compatible sidecar gateway for vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
# The gateway's own data (the ledger's spool, the jobs' files): a volume mounted here starts owned
# by the gateway's user, so it stays writable under a read-only root filesystem.
RUN mkdir -p /var/lib/llm-gateway && chown 10001:10001 /var/lib/llm-gateway
# Listen on all interfaces inside the container. Without an `auth` section the gateway refuses a
# non-loopback address: mount a config with auth (examples/auth-limits.yaml) or, for a demo only,
# set GATEWAY_SERVER__ALLOW_UNAUTHENTICATED=true (docker-compose.yml does, and says so).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_SERVER__HOST=0.0.0.0 \
    GATEWAY_SERVER__PORT=8080
# Numeric UID so Kubernetes' runAsNonRoot can verify it; works with a read-only root filesystem.
USER 10001:10001
EXPOSE 8080
# Python, not curl (the slim image has none); 127.0.0.1, not localhost (which may resolve to ::1
# while uvicorn listens on IPv4 only); /ready, so "healthy" means a backend is serving. The start
# period covers the gateway's own start; vLLM's model load is covered by the orchestrator waiting
# for vLLM first (compose depends_on, ECS dependsOn HEALTHY), not by this check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; p=os.environ.get('GATEWAY_SERVER__PORT','8080'); sys.exit(0 if u.urlopen('http://127.0.0.1:'+p+'/ready', timeout=2).status == 200 else 1)"]
# SIGTERM (the default) makes uvicorn stop accepting and drain in-flight requests for
# server.drain_seconds; the exec form makes llm-gateway PID 1, so the signal reaches it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-gateway"]
CMD ["serve"]
