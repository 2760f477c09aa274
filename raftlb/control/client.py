"""The control plane's HTTP client (announce streams, status polls): httpx, with a TLS connect that closes its
socket when it is cancelled.

httpcore (1.0.x) closes the TCP connection under a TLS handshake that fails, but not under one that is
cancelled: `except Exception` does not see `CancelledError`. raftlb cancels control-plane requests by design
(a stopped subscription when a reload changes a cluster's TLS settings or removes a node, a liveness
deadline that passes mid-handshake), so each such cancel leaked a connected socket until the garbage
collector found it ("unclosed resource <TCPTransport>"). The network backend here closes it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

log = logging.getLogger("raftlb.control.stream")


class _Stream(httpcore.AsyncNetworkStream):
    """A connected stream whose TLS handshake closes the connection on any way out but success."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        try:
            return await self._stream.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            # Cancelled (or failed: closing twice is harmless). The socket is closed before aclose's first
            # suspension, so a second cancel cannot leave it open either.
            await self._stream.aclose()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio backend, with connections that are closed when their TLS handshake is cancelled."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def make_client(verify: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """The control plane's client. Each node has one request in flight at most, so the node count bounds
    the connections; each request passes timeouts from the cluster config. `verify`: the TLS context for a
    cluster's https nodes (CA, client certificate)."""
    transport = httpx.AsyncHTTPTransport(
        verify=verify if verify is not None else True,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30.0),
        trust_env=False,  # HTTP_PROXY and friends are meant for clients, not for a proxy's own nodes
    )
    pool = transport._pool
    # (httpx offers no parameter for the network backend; its pool takes one, and reads it per connection)
    if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = _Backend()
    else:  # another httpx/httpcore: run without the fix rather than not at all
        log.warning("unexpected httpx transport internals (%r): a cancelled TLS handshake to a node may "
                    "leave its socket to the garbage collector", pool)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0), trust_env=False)
