"""h2's client connection as raftlb's HTTP/2 clients use it (the upstream pool, raftlb.proxy.h2pool, and
`raftlb bench --http2`, raftlb.tools.bench_http): one that lets the streams a GOAWAY spares finish.

h2 takes a GOAWAY it receives for the end of the whole connection: it rejects every frame after it and drops
what it has queued to send. But the peer goes on with the streams up to the GOAWAY's last stream id and
answers them (RFC 9113 §6.8; what etcd's gRPC server and raftlb's own listener do when they drain), and those
streams still need their frames (WINDOW_UPDATEs, request body). `client_connection` keeps the connection
open on a GOAWAY; its owner opens no new stream on it once it has seen one.

These are h2's public classes and methods, overridden; `pyproject.toml` pins h2 below 5, and the pool's and
the bench's GOAWAY tests check the behaviour.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine


class GoawayKeepsStreams(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY received while open leaves it open."""

    def process_input(self, input_: ConnectionInputs) -> list[Any]:
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state is ConnectionState.CLIENT_OPEN:
            return []
        return super().process_input(input_)


class ClientConnection(H2Connection):
    """h2's connection, except that what is queued to send is kept when a GOAWAY arrives."""

    def clear_outbound_data_buffer(self) -> None:
        pass


def client_connection(config: H2Configuration) -> ClientConnection:
    """A client-side h2 connection that lets the streams a received GOAWAY spares finish."""
    conn = ClientConnection(config=config)
    conn.state_machine = GoawayKeepsStreams()
    return conn
