# gateway-tap: one image for the tap (`serve`), the collectors (`collect NAME`) and the mock LLM.
# Build stage installs the project into a venv; the runtime stage copies only that venv.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/gateway-tap
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY gateway_tap ./gateway_tap
COPY collectors ./collectors
RUN /opt/gateway-tap/bin/pip install .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/gateway-tap/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_TAP_HEALTH_URL=http://127.0.0.1:8080/healthz
RUN groupadd --system --gid 10001 gateway-tap \
 && useradd --system --uid 10001 --gid gateway-tap --home-dir /var/lib/gateway-tap --create-home gateway-tap \
 && mkdir -p /var/lib/gateway-tap/spool /var/lib/gateway-tap/events /etc/gateway-tap \
 && chown -R gateway-tap:gateway-tap /var/lib/gateway-tap
COPY --from=build /opt/gateway-tap /opt/gateway-tap
USER 10001:10001
WORKDIR /var/lib/gateway-tap
# 8080: tap (proxy, /healthz, /metrics); 9465: collector /metrics and /healthz.
EXPOSE 8080 9465
# Collectors set GATEWAY_TAP_HEALTH_URL to their metrics port (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ['GATEWAY_TAP_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["gateway-tap"]
CMD ["serve", "--config", "/etc/gateway-tap/gateway-tap.yaml"]
