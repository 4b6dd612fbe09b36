# Bastion's image: api, gateway or worker (`bastion serve ...`), one image.
# Multi-stage: the wheel is built in the builder stage; the runtime stage gets
# the installed venv only (no compiler, no source, no pip cache, no secrets).
# Runs as a numeric non-root UID so Kubernetes' runAsNonRoot can check it, and
# writes nowhere but /tmp and BASTION_HOME (mount emptyDirs there with
# readOnlyRootFilesystem). No HEALTHCHECK: Kubernetes probes the /health routes.
# The base is pinned by digest (python:3.11-slim-bookworm); renew it with the tag.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/bastion \
 && /opt/bastion/bin/pip install -c constraints.txt /dist/*.whl

FROM ${PYTHON_IMAGE} AS runtime
# bubblewrap: the sandbox's process jail (libseccomp2 ships with the base).
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/bastion /opt/bastion
ENV PATH=/opt/bastion/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BASTION_HOME=/var/lib/bastion \
    HOME=/var/lib/bastion
RUN mkdir -p /var/lib/bastion && chown 10001:10001 /var/lib/bastion
USER 10001:10001
WORKDIR /var/lib/bastion
EXPOSE 8000 8001
ENTRYPOINT ["bastion"]
CMD ["serve", "--help"]
