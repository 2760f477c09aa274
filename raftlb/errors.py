"""The exception tree.

RaftLBError
├── ConfigError            a config file that cannot be used; names the YAML path (exit code 2)
└── ProxyError             an answer the proxy itself produces; knows its HTTP status and stable code
    ├── NoLeader           503 no_leader: no live leader within the hold timeout (with Retry-After)
    ├── HoldQueueFull      503 hold_queue_full: the hold budget (count or bytes) is exhausted
    ├── OutcomeUnknown     502 outcome_unknown: a non-idempotent write died after it was sent
    ├── UpstreamFailed     502 upstream_failed: the node failed and no re-send is left
    ├── UpstreamTimeout    504 upstream_timeout: the node did not answer within the response timeout
    ├── IndexNotReached    504 index_not_reached: no node reached the requested index in time
    ├── SessionGap         409 session_seq_gap: an earlier X-Raft-Seq of the session never arrived
    ├── BadRequest         400 bad_request: malformed or smuggling-prone HTTP
    ├── RequestTimeout     408 request_timeout: headers or body not received in time
    ├── PayloadTooLarge    413 payload_too_large
    ├── HeadersTooLarge    431 headers_too_large
    ├── MethodNotAllowed   405 method_not_allowed: CONNECT (raftlb does not tunnel)
    ├── ExpectationFailed  417 expectation_failed: an Expect other than 100-continue
    ├── VersionNotSupported 505 http_version_not_supported: an HTTP version other than 1.0 and 1.1
    └── Overloaded         503 overloaded: connection limit reached
"""

from __future__ import annotations

import json
import os


class RaftLBError(Exception):
    """Base of every error raftlb raises on purpose."""


class ConfigError(RaftLBError):
    """A configuration that cannot be used. `path` is the YAML path, e.g. `clusters[0].nodes[2].url`."""

    def __init__(self, path: str, message: str, line: int | None = None, file: str | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ProxyError(RaftLBError):
    """An error answered to the client as a JSON body with a stable `error` code."""

    status = 500
    code = "internal_error"
    retry_after: int | None = None

    def __init__(self, detail: str = "", **extra: object) -> None:
        self.detail = detail
        self.extra = extra
        super().__init__(detail or self.code)

    def body(self) -> bytes:
        doc: dict[str, object] = {"error": self.code}
        if self.detail:
            doc["detail"] = self.detail
        doc.update(self.extra)
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class NoLeader(ProxyError):
    status = 503
    code = "no_leader"

    def __init__(self, detail: str = "", retry_after: int = 1, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class HoldQueueFull(NoLeader):
    code = "hold_queue_full"


class OutcomeUnknown(ProxyError):
    status = 502
    code = "outcome_unknown"


class UpstreamFailed(ProxyError):
    status = 502
    code = "upstream_failed"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class IndexNotReached(ProxyError):
    status = 504
    code = "index_not_reached"


class SessionGap(ProxyError):
    status = 409
    code = "session_seq_gap"


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class BadConsistency(BadRequest):
    """`X-Raft-Consistency` names no read policy, or one the route cannot give (`bounded` without limits)."""

    code = "bad_consistency"


class BadMinIndex(BadRequest):
    """`X-Raft-Min-Index` is not a non-negative decimal integer."""

    code = "bad_min_index"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class HeadersTooLarge(ProxyError):
    status = 431
    code = "headers_too_large"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class ExpectationFailed(ProxyError):
    status = 417
    code = "expectation_failed"


class VersionNotSupported(ProxyError):
    status = 505
    code = "http_version_not_supported"


class Overloaded(ProxyError):
    status = 503
    code = "overloaded"

    def __init__(self, detail: str = "", retry_after: int = 1, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


def os_reason(exc: OSError) -> str:
    """The system's words for a failed call ("Address already in use"), without the library's wrapping."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
