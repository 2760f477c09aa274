"""Logging setup: text or JSON lines on stderr; the access log (logger `raftlb.access`, off by default)."""

from __future__ import annotations

import json
import logging
import sys
import time

from raftlb.config.model import LoggingConfig
from raftlb.http.exchange import Exchange
from raftlb.http.h2server import H2Exchange

access_log = logging.getLogger("raftlb.access")


_worker: int | None = None  # this process's worker index (`workers: N`), for every log line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _worker is not None:
            doc["worker"] = _worker
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(cfg: LoggingConfig, worker: int | None = None) -> None:
    """Log lines to stderr; `worker` (set once, in a worker process) is named on each line."""
    global _worker
    if worker is not None:
        _worker = worker
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        who = "%(name)s" if _worker is None else f"%(name)s[w{_worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {who}: %(message)s"))
    root = logging.getLogger("raftlb")
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    root.propagate = False
    logging.getLogger("raftlb.access").disabled = not cfg.access_log


def access_enabled() -> bool:
    return not access_log.disabled and access_log.isEnabledFor(logging.INFO)


def log_access(cluster: str, node: str | None, ex: Exchange, seconds: float) -> None:
    """One line per proxied request: client, request line, status, cluster/node, duration. JSON lines carry
    the same as fields (`client`, `method`, `target`, `status`, `cluster`, `node`, `duration_ms`)."""
    target = ex.target.decode("latin-1")
    ms = round(seconds * 1000, 3)
    fields: dict[str, object] = {"client": ex.client_addr, "method": ex.method, "target": target,
                                 "status": ex.status, "cluster": cluster, "node": node, "duration_ms": ms,
                                 "protocol": "http1"}
    suffix = ""
    if isinstance(ex, H2Exchange):
        if ex.grpc_status >= 0:
            fields["protocol"] = "grpc"
            fields["grpc_status"] = ex.grpc_status
            suffix = f" grpc-status={ex.grpc_status}"
        else:
            fields["protocol"] = "http2"
            suffix = " h2"
    access_log.info('%s "%s %s" %d %s/%s %.1fms%s', ex.client_addr, ex.method, target, ex.status, cluster,
                    node or "-", ms, suffix, extra={"access": fields})
