"""The HTTP/2 upstream pool of one node (`H2NodePool`) against a real HTTP/2 origin
(tests/support/h2_origin.py, asyncio + h2 on a local port): streams multiplexed on one connection, queued
beyond the node's stream limit, answers with trailers, flow control both ways (a request body larger than the
node's windows; a paused listener keeps the node's window shut), and how each failure is classified for a
re-send (`written`): a GOAWAY, REFUSED_STREAM and other resets, a connection lost mid-answer, a refused
connect, a deadline; idle connections closed by the sweep; the pool's close. No sockets are mocked."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import trustme
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from raftlb.core import etcdpb, grpc
from raftlb.core.protowire import bytes_field
from raftlb.proxy.h2pool import H2NodePool, UpstreamStream
from tests.support.etcd_cluster import EtcdCluster, etcd_binary
from tests.support.h2_origin import WAIT, H2Origin, h2_origin


class Call:
    """A `StreamListener`: one request (`path`, and a body if any) and what it heard."""

    def __init__(self, path: str, body: bytes = b"", *, pause_on_data: bool = False, finish: bool = True,
                 headers: list[tuple[bytes, bytes]] | None = None, parts: list[bytes] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.path = path
        self.request_body = body
        self.pause_on_data = pause_on_data  # pause reading at the first data (a slow client)
        self.finish = finish  # the request body ends (else it is still "coming")
        self.parts = parts
        self.request_headers = headers if headers is not None else [
            (b":method", b"POST" if body or parts else b"GET"), (b":scheme", b"http"),
            (b":authority", b"node"), (b":path", path.encode())]
        self.stream: UpstreamStream | None = None
        self.ready: asyncio.Future[UpstreamStream] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.error: tuple[str, bool, bool] | None = None
        self.pauses = 0
        self.resumes = 0
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.got_data = asyncio.Event()
        self.callbacks_after_end = 0

    def on_stream_ready(self, stream: UpstreamStream) -> None:
        self.stream = stream
        self.ready.set_result(stream)
        body = self.request_body
        if self.parts is not None:
            # A body that comes in parts, its end apart (given before the HEADERS: the stream keeps it).
            for part in self.parts:
                stream.send_data(part)
            stream.end()
            stream.send_headers(self.request_headers, end_stream=False)
            return
        stream.send_headers(self.request_headers, end_stream=not body and self.finish)
        if body:
            stream.send_data(body, end_stream=self.finish)

    def _over(self) -> bool:
        if self.ended.done():
            self.callbacks_after_end += 1
            return True
        return False

    def on_stream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if not self._over():
            self.status = status
            self.headers = headers

    def on_stream_data(self, data: bytes) -> None:
        if self._over():
            return
        self.body += data
        self.got_data.set()
        if self.pause_on_data and self.stream is not None:
            self.pause_on_data = False
            self.stream.pause_reading()

    def on_stream_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if not self._over():
            self.trailers = headers

    def on_stream_end(self) -> None:
        if not self._over():
            self.ended.set_result("end")

    def on_stream_error(self, reason: str, written: bool, timeout: bool = False) -> None:
        if not self._over():
            self.error = (reason, written, timeout)
            self.ended.set_result("error")

    def on_stream_pause(self) -> None:
        self.pauses += 1
        self.paused.set()

    def on_stream_resume(self) -> None:
        self.resumes += 1
        self.resumed.set()

    async def result(self) -> str:
        return await asyncio.wait_for(asyncio.shield(self.ended), WAIT)


@contextlib.asynccontextmanager
async def pool_for(origin: H2Origin | None, port: int = 0, *, max_connections: int = 4,
                   write_buffer_high: int = 256 * 1024, initial_window_size: int = 1 << 20,
                   ) -> AsyncIterator[H2NodePool]:
    pool = H2NodePool("n1", "127.0.0.1", origin.port if origin is not None else port, connect_timeout=5.0,
                      idle_timeout=60.0, max_connections=max_connections, write_buffer_high=write_buffer_high,
                      initial_window_size=initial_window_size)
    try:
        yield pool
    finally:
        pool.close()


async def wait_until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- multiplexing and the node's stream limit ----------------------------------------------------------------

async def test_many_streams_share_one_connection_and_all_complete() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        calls = [Call("/hold") for _ in range(20)]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 20)
        assert len(origin.connections) == 1 and origin.max_open == 20
        assert pool.active == 20 and pool.waiting == 0 and pool.connections == 1
        origin.release()
        assert [await c.result() for c in calls] == ["end"] * 20
        assert all(c.status == 200 and bytes(c.body) == b"ok" for c in calls)
        assert pool.active == 0 and pool.connections == 1
        # The connection is reused: a new stream opens on it at once.
        call = Call("/echo", b"again")
        pool.open(call)
        assert call.ready.done()
        assert await call.result() == "end" and bytes(call.body) == b"again"
        assert len(origin.connections) == 1 and not any(c.callbacks_after_end for c in calls)


async def test_streams_beyond_the_nodes_limit_wait_their_turn_in_order() -> None:
    async with h2_origin(max_concurrent_streams=2) as origin, pool_for(origin, max_connections=1) as pool:
        calls = [Call("/hold"), Call("/hold"), Call("/echo", b"3"), Call("/echo", b"4"), Call("/echo", b"5")]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 2)
        assert pool.active == 2 and pool.waiting == 3
        assert not any(c.ready.done() for c in calls[2:])
        origin.release()
        assert [await c.result() for c in calls] == ["end"] * 5
        assert [bytes(c.body) for c in calls] == [b"ok", b"ok", b"3", b"4", b"5"]
        assert [r.path for r in origin.requests] == ["/hold", "/hold", "/echo", "/echo", "/echo"]
        assert origin.max_open <= 2 and len(origin.connections) == 1


async def test_a_full_connection_makes_the_pool_open_another_up_to_its_maximum() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=2) as pool:
        calls = [Call("/hold") for _ in range(3)]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 2)
        assert len(origin.connections) == 2 and pool.active == 2 and pool.waiting == 1
        origin.release()
        await origin.wait_for(lambda: len(origin.requests) == 3)
        origin.release()
        assert [await c.result() for c in calls] == ["end"] * 3


async def test_a_higher_stream_limit_from_the_node_lets_the_waiters_in() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=1) as pool:
        calls = [Call("/hold") for _ in range(3)]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        assert pool.waiting == 2
        origin.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
        await origin.wait_for(lambda: len(origin.requests) == 3)
        assert pool.waiting == 0 and pool.active == 3 and len(origin.connections) == 1
        origin.release()
        assert [await c.result() for c in calls] == ["end"] * 3


async def test_a_queued_listener_can_cancel() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=1) as pool:
        first, second, third = Call("/hold"), Call("/echo", b"2"), Call("/echo", b"3")
        for call in (first, second, third):
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        pool.cancel(second)
        assert pool.waiting == 1
        origin.release()
        assert await first.result() == "end" and await third.result() == "end"
        assert not second.ready.done() and not second.ended.done()


# -- answers -------------------------------------------------------------------------------------------------

async def test_an_answer_with_trailers_and_informational_heads_skipped() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        call, info = Call("/trailers"), Call("/info")
        pool.open(call)
        pool.open(info)
        assert await call.result() == "end"
        assert call.status == 200 and (b"content-type", b"text/plain") in call.headers
        assert all(not name.startswith(b":") for name, _ in call.headers)
        assert bytes(call.body) == b"hello"
        assert call.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
        assert await info.result() == "end" and info.status == 200 and bytes(info.body) == b"ok"
        assert info.trailers is None


async def test_a_large_answer_flows_through_the_windows() -> None:
    size = 3 * 1024 * 1024
    async with h2_origin() as origin, pool_for(origin, initial_window_size=65535) as pool:
        call = Call(f"/big/{size}")
        pool.open(call)
        assert await call.result() == "end" and len(call.body) == size


async def test_a_headers_only_answer_is_a_head_then_the_end() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        call = Call("/only")
        pool.open(call)
        assert await call.result() == "end"
        assert call.status == 200 and call.headers == [(b"grpc-status", b"14")]
        assert call.body == b"" and call.trailers is None
        assert pool.active == 0


@pytest.mark.parametrize("pending", [True, False], ids=["body_buffered", "body_open"])
async def test_an_answer_that_ends_before_the_request_closes_the_stream(pending: bool) -> None:
    # The node answers before the request body is all sent (a gRPC server ending a call early): the stream
    # ends for the listener, and its request side is closed too (reset when body is still buffered, else
    # END_STREAM), so the slot is free.
    body = b"x" * (1024 * 1024) if pending else b"part"
    async with h2_origin(hold_windows=True, max_concurrent_streams=1) as origin, \
            pool_for(origin, max_connections=1) as pool:
        call, after = Call("/early", body, finish=pending), Call("/echo", b"after")
        pool.open(call)
        pool.open(after)
        assert await call.result() == "end" and bytes(call.body) == b"early"
        stream = await asyncio.wait_for(call.ready, WAIT)
        if pending:
            await origin.wait_for(lambda: (stream.stream_id, ErrorCodes.CANCEL) in origin.resets)
        else:
            await origin.wait_for(lambda: stream.stream_id in origin.ended)
        origin.open_windows()
        assert await after.result() == "end" and bytes(after.body) == b"after"
        assert call.callbacks_after_end == 0


async def test_headers_h2_refuses_to_send_fail_the_stream_unsent_and_retire_the_connection() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        bad = Call("/echo", headers=[(b":method", b"GET"), (b":path", b"/echo")])  # (no :scheme, :authority)
        pool.open(bad)
        assert await bad.result() == "error"
        assert bad.error is not None and bad.error[1] is False and "not sent" in bad.error[0]
        good = Call("/echo", b"ok")
        pool.open(good)
        assert await good.result() == "end" and bytes(good.body) == b"ok"
        assert len(origin.connections) == 2 and pool.connections == 1


# -- flow control --------------------------------------------------------------------------------------------

async def test_a_request_body_larger_than_the_windows_is_buffered_and_pauses_its_listener() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    async with h2_origin(hold_windows=True) as origin, pool_for(origin, write_buffer_high=64 * 1024) as pool:
        call = Call("/echo", body)
        pool.open(call)
        # The node takes its initial windows' worth and no more: the rest waits in the stream, and the
        # listener is told to stop reading its client's body.
        await wait_until(call.paused)
        await origin.wait_for(lambda: len(origin.requests) == 1 and len(origin.requests[0].body) == 65535)
        assert not call.resumed.is_set()
        origin.open_windows()
        await wait_until(call.resumed)
        assert await call.result() == "end"
        assert bytes(origin.requests[0].body) == body and bytes(call.body) == body
        assert call.pauses == 1 and call.resumes == 1


async def test_a_body_in_parts_ended_apart_even_before_the_headers() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        call = Call("/echo", parts=[b"one ", b"two ", b"three"])
        pool.open(call)
        assert await call.result() == "end" and bytes(call.body) == b"one two three"


async def test_a_socket_that_does_not_drain_pauses_every_streams_body() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        calls = [Call("/hold"), Call("/hold")]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 2)
        (conn,) = pool.conns
        conn.pause_writing()  # (what the transport calls above its high-water mark)
        assert all(c.pauses == 1 for c in calls)
        conn.resume_writing()
        assert all(c.resumes == 1 for c in calls)
        origin.release()
        assert [await c.result() for c in calls] == ["end"] * 2


async def test_a_paused_listener_keeps_the_nodes_window_shut_until_it_resumes() -> None:
    size = 1024 * 1024
    window = 65535
    async with h2_origin() as origin, pool_for(origin, initial_window_size=window) as pool:
        slow, other = Call(f"/big/{size}", pause_on_data=True), Call(f"/big/{size}")
        pool.open(slow)
        await wait_until(slow.got_data)
        stream = await asyncio.wait_for(slow.ready, WAIT)
        # The node stops: the stream's window is not given back while its listener is paused.
        await origin.wait_for(lambda: stream.stream_id in origin.blocked)
        assert len(slow.body) <= window
        # Another stream on the same connection is not held up by it (the connection's window goes back).
        pool.open(other)
        assert await other.result() == "end" and len(other.body) == size
        assert not slow.ended.done()
        stream.resume_reading()
        assert await slow.result() == "end" and len(slow.body) == size
        assert len(origin.connections) == 1


# -- failures and their classification -----------------------------------------------------------------------

async def test_goaway_fails_the_streams_above_its_last_id_as_unsent_and_finishes_the_others() -> None:
    async with h2_origin() as origin, pool_for(origin, max_connections=1) as pool:
        calls = [Call("/hold") for _ in range(3)]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 3)
        ids = [r.stream_id for r in origin.requests]
        assert ids == [1, 3, 5]
        # (gRPC servers first announce a GOAWAY that covers every stream, then the real one.)
        origin.goaway(last_stream_id=2**31 - 1)
        origin.goaway(last_stream_id=3)
        assert await calls[2].result() == "error"
        assert calls[2].error is not None and calls[2].error[1] is False  # (safe to send again)
        assert not calls[0].ended.done() and not calls[1].ended.done()
        # No new stream on the draining connection: a new connection takes it.
        later = Call("/echo", b"later")
        pool.open(later)
        assert await later.result() == "end" and bytes(later.body) == b"later"
        assert len(origin.connections) == 2
        # The node answers what it took, after its GOAWAY; then the old connection closes.
        origin.release()
        assert await calls[0].result() == "end" and await calls[1].result() == "end"
        assert bytes(calls[0].body) == b"ok"
        await origin.wait_for(lambda: origin.closed_connections == 1)
        assert pool.connections == 1


async def test_goaway_with_an_error_fails_the_streams_it_had_taken_as_written() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        calls = [Call("/hold"), Call("/hold")]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 2)
        origin.goaway(last_stream_id=1, code=ErrorCodes.INTERNAL_ERROR)
        assert await calls[0].result() == "error" and await calls[1].result() == "error"
        assert calls[0].error is not None and calls[0].error[1] is True
        assert calls[1].error is not None and calls[1].error[1] is False
        assert pool.connections == 0


@pytest.mark.parametrize(("path", "written"), [("/refuse", False), ("/reset", True)])
async def test_a_stream_reset_by_the_node_is_unsent_only_when_refused(path: str, written: bool) -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        call, other = Call(path), Call("/echo", b"fine")
        pool.open(call)
        pool.open(other)
        assert await call.result() == "error"
        assert call.error is not None and call.error[1] is written and not call.error[2]
        # The connection and its other streams go on.
        assert await other.result() == "end" and bytes(other.body) == b"fine"
        assert pool.connections == 1 and pool.active == 0


async def test_a_connection_lost_mid_answer_fails_every_stream_on_it_as_written() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        held = Call("/hold")
        pool.open(held)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        dropped = Call("/drop")
        pool.open(dropped)
        assert await dropped.result() == "error" and await held.result() == "error"
        assert dropped.error is not None and dropped.error[1] is True
        assert held.error is not None and held.error[1] is True
        assert dropped.status == 200
        assert pool.connections == 0 and pool.active == 0
        # The next stream gets a new connection.
        call = Call("/echo", b"next")
        pool.open(call)
        assert await call.result() == "end" and bytes(call.body) == b"next"


async def test_a_node_killed_with_streams_open_fails_them_all() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        calls = [Call("/hold") for _ in range(5)]
        for call in calls:
            pool.open(call)
        await origin.wait_for(lambda: len(origin.requests) == 5)
        origin.drop_all()
        assert [await c.result() for c in calls] == ["error"] * 5
        assert all(c.error is not None and c.error[1] is True for c in calls)


async def test_a_protocol_error_from_the_node_closes_the_connection_and_fails_its_streams() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        held, bad = Call("/hold"), Call("/garbage")
        pool.open(held)
        pool.open(bad)
        assert await held.result() == "error" and await bad.result() == "error"
        assert bad.error is not None and "protocol error" in bad.error[0]
        assert pool.connections == 0


async def test_a_refused_connect_fails_every_waiter_as_unsent() -> None:
    async with pool_for(None, port=dead_port()) as pool:
        calls = [Call("/echo", b"x") for _ in range(3)]
        for call in calls:
            pool.open(call)
        assert [await c.result() for c in calls] == ["error"] * 3
        for call in calls:
            assert call.error is not None and call.error[1] is False and "connect failed" in call.error[0]
        assert pool.connections == 0 and pool.waiting == 0 and pool.connect_failures == 1


async def test_a_node_that_never_sends_its_settings_times_out_the_connect() -> None:
    # A TCP listener that never speaks HTTP/2 (a frozen node's socket).
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = H2NodePool("n1", "127.0.0.1", port, connect_timeout=0.2, idle_timeout=60.0)
        call = Call("/echo", b"x")
        pool.open(call)
        assert await call.result() == "error"
        assert call.error == ("connect timeout", False, False)
        assert pool.connections == 0
        pool.close()
    finally:
        for writer in accepted:
            writer.close()
        server.close()


async def test_a_stream_past_its_deadline_times_out_and_is_reset() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        slow, fine = Call("/never"), Call("/hold")
        pool.open(slow)
        pool.open(fine)
        await origin.wait_for(lambda: len(origin.requests) == 2)
        stream = await asyncio.wait_for(slow.ready, WAIT)
        stream.deadline = time.monotonic() - 1.0
        pool.sweep(time.monotonic())
        assert await slow.result() == "error"
        assert slow.error is not None and slow.error[1:] == (True, True)
        await origin.wait_for(lambda: (stream.stream_id, ErrorCodes.CANCEL) in origin.resets)
        origin.release()
        assert await fine.result() == "end"


async def test_cut_stalled_fails_only_the_streams_the_node_has_gone_quiet_on() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        quiet = Call("/never")
        pool.open(quiet)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        pool.cut_stalled(time.monotonic(), 3600.0, "node down")  # (quiet for less than that)
        assert not quiet.ended.done()
        pool.cut_stalled(time.monotonic() + 10.0, 5.0, "node down")
        assert await quiet.result() == "error"
        assert quiet.error is not None and quiet.error[1] is True and quiet.error[0].startswith("node down")


class ChangesItsMind(Call):
    """Resets its stream as soon as it gets it, before sending anything."""

    def on_stream_ready(self, stream: UpstreamStream) -> None:
        self.stream = stream
        self.ready.set_result(stream)
        stream.reset()


async def test_a_stream_reset_before_its_headers_frees_its_slot_quietly() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=1) as pool:
        first, second = ChangesItsMind("/echo"), Call("/echo", b"2")
        pool.open(first)
        pool.open(second)
        assert await second.result() == "end"
        assert not first.ended.done() and [r.path for r in origin.requests] == ["/echo"]
        assert origin.resets == []


async def test_a_listener_reset_gets_no_more_callbacks_and_frees_its_slot() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=1) as pool:
        first, second = Call("/never"), Call("/echo", b"2")
        pool.open(first)
        pool.open(second)
        stream = await asyncio.wait_for(first.ready, WAIT)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        stream.reset()
        assert await second.result() == "end"
        await origin.wait_for(lambda: (stream.stream_id, ErrorCodes.CANCEL) in origin.resets)
        assert not first.ended.done()


# -- idle connections and close ------------------------------------------------------------------------------

async def test_an_idle_connection_is_closed_by_the_sweep_with_goaway() -> None:
    async with h2_origin() as origin, pool_for(origin) as pool:
        call = Call("/echo", b"x")
        pool.open(call)
        assert await call.result() == "end"
        pool.sweep(time.monotonic())
        assert pool.connections == 1
        pool.sweep(time.monotonic() + 61.0)
        assert pool.connections == 0
        await origin.wait_for(lambda: origin.goaways_received == 1 and origin.closed_connections == 1)


async def test_close_fails_open_streams_as_written_and_waiters_as_unsent() -> None:
    async with h2_origin(max_concurrent_streams=1) as origin, pool_for(origin, max_connections=1) as pool:
        active, queued = Call("/hold"), Call("/hold")
        pool.open(active)
        pool.open(queued)
        await origin.wait_for(lambda: len(origin.requests) == 1)
        pool.close()
        assert await active.result() == "error" and await queued.result() == "error"
        assert active.error is not None and active.error[1] is True
        assert queued.error is not None and queued.error[1] is False
        assert pool.connections == 0 and pool.waiting == 0
        late = Call("/echo")
        pool.open(late)
        assert await late.result() == "error"
        await origin.wait_for(lambda: origin.closed_connections == 1)


# -- TLS -----------------------------------------------------------------------------------------------------

async def test_tls_with_alpn_h2() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2"])
    async with h2_origin(ssl=server_ctx) as origin:
        pool = H2NodePool("n1", "127.0.0.1", origin.port, connect_timeout=5.0, idle_timeout=60.0,
                          ssl=client_ctx)
        try:
            calls = [Call("/echo", b"secret"), Call("/trailers")]
            for call in calls:
                pool.open(call)
            assert [await c.result() for c in calls] == ["end", "end"]
            assert bytes(calls[0].body) == b"secret" and calls[1].trailers is not None
            assert len(origin.connections) == 1
        finally:
            pool.close()


async def test_tls_to_a_node_that_does_not_speak_h2_fails_the_connect() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["http/1.1"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    async with h2_origin(ssl=server_ctx) as origin:
        pool = H2NodePool("n1", "127.0.0.1", origin.port, connect_timeout=5.0, idle_timeout=60.0,
                          ssl=client_ctx)
        try:
            call = Call("/echo", b"x")
            pool.open(call)
            assert await call.result() == "error"
            assert call.error is not None and call.error[1] is False and "ALPN" in call.error[0]
            assert pool.connections == 0
        finally:
            pool.close()


# -- a real etcd member (gRPC over h2c) ---------------------------------------------------------------------

class GrpcCall(Call):
    """A raw gRPC call: request messages framed by hand, answer messages collected (`messages`, each sets
    `message`). `more`: the request stays open (a stream such as a Watch)."""

    def __init__(self, authority: str, method: str, *requests: bytes, more: bool = False) -> None:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", authority.encode()),
                   (b":path", method.encode()), (b"content-type", grpc.CONTENT_TYPE), (b"te", b"trailers")]
        super().__init__(method, b"".join(grpc.frame(r) for r in requests), finish=not more, headers=headers)
        self.reader = grpc.MessageReader()
        self.messages: list[bytes] = []
        self.message = asyncio.Event()

    def on_stream_data(self, data: bytes) -> None:
        super().on_stream_data(data)
        for msg in self.reader.feed(data):
            self.messages.append(msg.payload)
            self.message.set()

    async def next_message(self, count: int) -> bytes:
        """The `count`-th answer message (1-based), once it is in."""
        async with asyncio.timeout(WAIT):
            while len(self.messages) < count:
                self.message.clear()
                await self.message.wait()
        return self.messages[count - 1]

    def grpc_status(self) -> int:
        head = self.trailers if self.trailers is not None else self.headers
        return grpc.read_status(head, trailers_only_answer=self.trailers is None).status


@pytest.fixture(params=[pytest.param("distro", id="etcd3.5"), pytest.param("debian", id="etcd3.4")])
def etcd_member(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    binary = etcd_binary(request.param)
    if binary is None:
        pytest.skip("no etcd binary")
    with EtcdCluster(binary, size=1) as cluster:
        yield cluster


@pytest.mark.integration
async def test_grpc_calls_and_a_watch_to_a_real_etcd_member_then_its_death(etcd_member: EtcdCluster) -> None:
    member = etcd_member.members["n1"]
    authority = f"{member.host}:{member.client_port}"
    pool = H2NodePool("n1", member.host, member.client_port, connect_timeout=5.0, idle_timeout=60.0)
    try:
        # A Watch (a bidirectional stream, its request side left open) and, beside it on the same connection,
        # a put larger than etcd's initial windows and a range that reads it back.
        create = bytes_field(1, bytes_field(1, b"k"))  # WatchRequest.create_request{key}
        watch = GrpcCall(authority, "/etcdserverpb.Watch/Watch", create, more=True)
        pool.open(watch)
        created = await watch.next_message(1)
        assert etcdpb.response_revision(created) is not None
        value = bytes(range(256)) * 4096  # 1 MiB
        put = GrpcCall(authority, etcdpb.KV_PUT, etcdpb.put_request(b"k", value))
        pool.open(put)
        assert await put.result() == "end" and put.grpc_status() == grpc.Status.OK
        revision = etcdpb.response_revision(put.messages[0])
        event = await watch.next_message(2)
        assert etcdpb.response_revision(event) == revision and value in event
        got = GrpcCall(authority, etcdpb.KV_RANGE, etcdpb.range_request(b"k"))
        pool.open(got)
        assert await got.result() == "end" and got.grpc_status() == grpc.Status.OK
        assert value in got.messages[0]
        assert pool.connections == 1 and pool.active == 1  # (the watch)
        # The member dies: the watch ends with an error, as possibly seen; a new call cannot connect.
        etcd_member.kill("n1", signal.SIGKILL)
        assert await watch.result() == "error"
        assert watch.error is not None and watch.error[1] is True
        late = GrpcCall(authority, etcdpb.KV_RANGE, etcdpb.range_request(b"k"))
        pool.open(late)
        assert await late.result() == "error"
        assert late.error is not None and late.error[1] is False
    finally:
        pool.close()
