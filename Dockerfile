# raftlb container image: `docker build -t raftlb:0.1.0 .`
#
# Mount the config at /etc/raftlb/raftlb.yaml (configs/container.yaml to start from; a ConfigMap in Kubernetes:
# deploy/kubernetes/). The listeners and the admin listener must bind 0.0.0.0 inside a container; the admin
# port (9090 by default) serves /healthz for the HEALTHCHECK below, /readyz, /metrics and the status page.
# SIGTERM drains (readiness 503, stop accepting, finish in-flight requests within drain_timeout, exit 0);
# SIGHUP reloads the config file. The image holds the runtime dependencies only (no demo or test extras).

# A fixed Python and Debian release: rebuilding the image does not change them behind your back.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# raftlb's own wheel; this stage alone reruns when the source changes.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY raftlb ./raftlb
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAFTLB_HEALTH_URL=http://127.0.0.1:9090/healthz
RUN groupadd --system --gid 10001 raftlb \
    && useradd --system --uid 10001 --gid raftlb --no-create-home --shell /usr/sbin/nologin raftlb \
    && mkdir -p /etc/raftlb
# The runtime dependencies (project.dependencies, no extras) in their own layer, before any source: a change
# to raftlb/ reuses this layer, only a change to pyproject.toml installs them again.
COPY pyproject.toml /tmp/raftlb/
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/raftlb/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/raftlb/requirements.txt \
    && pip install --no-cache-dir -r /tmp/raftlb/requirements.txt \
    && rm -rf /tmp/raftlb
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# 8080: the proxy listener of configs/container.yaml; 9090: the admin listener.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = os.environ['RAFTLB_HEALTH_URL']; sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["raftlb"]
CMD ["run", "-c", "/etc/raftlb/raftlb.yaml"]
