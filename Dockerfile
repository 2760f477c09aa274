# raftlb container image: `docker build -t raftlb:0.1.0 .`
#
# Mount the config at /etc/raftlb/raftlb.yaml (a ConfigMap in Kubernetes: deploy/kubernetes/). The listeners and
# the admin listener must bind 0.0.0.0 inside a container; the admin port (9090 by default) serves /healthz for
# the HEALTHCHECK below, /readyz, /metrics and the status page. SIGTERM drains (readiness 503, stop accepting,
# finish in-flight requests within drain_timeout, exit 0); SIGHUP reloads the config file.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY raftlb ./raftlb
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAFTLB_HEALTH_URL=http://127.0.0.1:9090/healthz
RUN groupadd --system --gid 10001 raftlb \
    && useradd --system --uid 10001 --gid raftlb --no-create-home --shell /usr/sbin/nologin raftlb \
    && mkdir -p /etc/raftlb
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# 8080: the proxy listener in the example config; 9090: the admin listener.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = os.environ['RAFTLB_HEALTH_URL']; sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["raftlb"]
CMD ["run", "-c", "/etc/raftlb/raftlb.yaml"]
