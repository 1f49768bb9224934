# syntax=docker/dockerfile:1
# siphon: the event-sourced SIP registrar/proxy, one node per container.
#
#   docker build -t siphon:local .
#   docker run --rm -v "$PWD/compose/config:/etc/siphon:ro" siphon:local run -c /etc/siphon/siphon.yaml
#
# compose/docker-compose.yaml builds it and runs three nodes, Kafka, the audit
# follower and Prometheus. The image runs as the unprivileged user "siphon"; its
# default config (a copy of compose/config/) expects Kafka at kafka:9092.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install siphon and its dependencies (all wheels) into a venv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/siphon
COPY pyproject.toml README.md ./
COPY siphon ./siphon
COPY events ./events
COPY projections ./projections
COPY replay ./replay
RUN /opt/siphon/bin/pip install --no-cache-dir . \
    && /opt/siphon/bin/siphon --help > /dev/null

# ---- runtime: the venv, the default config, an unprivileged user
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="siphon" \
      org.opencontainers.image.description="Event-sourced SIP registrar and proxy, scripted in Python"
RUN groupadd --system --gid 10001 siphon \
    && useradd --system --uid 10001 --gid siphon --home-dir /var/lib/siphon \
       --no-create-home --shell /usr/sbin/nologin siphon \
    && mkdir -p /etc/siphon /var/lib/siphon \
    && chown siphon:siphon /var/lib/siphon
COPY --from=build /opt/siphon /opt/siphon
COPY compose/config/siphon.yaml compose/config/registrar.py /etc/siphon/
ENV PATH=/opt/siphon/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIPHON_SIP_LISTEN=0.0.0.0:5060 \
    SIPHON_HTTP_LISTEN=0.0.0.0:8080 \
    SIPHON_ADMIN_LISTEN=0.0.0.0:9091 \
    SIPHON_DATA_DIR=/var/lib/siphon
USER 10001:10001
WORKDIR /var/lib/siphon
VOLUME ["/var/lib/siphon"]
# SIP (UDP and TCP), the trunk registry (HTTP), the admin API with /ready and /metrics
EXPOSE 5060/udp 5060/tcp 8080/tcp 9091/tcp
# Healthy once the node serves SIP: GET /ready on the admin listener
# (SIPHON_ADMIN_LISTEN, the variable the config reads) answers 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SIPHON_ADMIN_LISTEN', '0.0.0.0:9091').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["siphon"]
CMD ["run", "-c", "/etc/siphon/siphon.yaml"]
