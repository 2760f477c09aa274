"""TLS contexts for the listeners (server side) and for https nodes and announce streams (client side)."""

from __future__ import annotations

import ssl

from raftlb.config.model import TlsConfig


def server_context(tls: TlsConfig, h2: bool = False) -> ssl.SSLContext:
    """A listener's context: its certificate, and client certificates required when `ca` is set (mTLS);
    with `h2`, ALPN offers HTTP/2 before HTTP/1.1. `reload_server_context` re-reads the files into the same
    object: new handshakes use them at once."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    reload_server_context(ctx, tls)
    return ctx


def reload_server_context(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    assert tls.cert is not None and tls.key is not None
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(cafile=tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED


def client_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """The context for https nodes: verify them against `ca` (or the system store), present a client
    certificate when configured."""
    ctx = ssl.create_default_context(cafile=tls.ca if tls and tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None:
        if tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
        if not tls.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    return ctx
