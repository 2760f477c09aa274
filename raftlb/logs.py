"""Logging setup: text or JSON lines on stderr; the access log (logger `raftlb.access`, off by default)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from raftlb.config import LoggingConfig

if TYPE_CHECKING:
    from raftlb.http.server import Exchange

access_log = logging.getLogger("raftlb.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(cfg: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
    fields = {"client": ex.client_addr, "method": ex.method, "target": target, "status": ex.status,
              "cluster": cluster, "node": node, "duration_ms": ms}
    access_log.info('%s "%s %s" %d %s/%s %.1fms', ex.client_addr, ex.method, target, ex.status, cluster,
                    node or "-", ms, extra={"access": fields})
