"""What the data path does differently per cluster kind (pure functions, chosen once per cluster).

- native (raft-announce/1): nodes put `X-Raft-Index` on every answer; nothing to add.
- etcd (JSON gateway): writes carry `Grpc-Metadata-hasleader: true`, so a member that has lost its leader
  fails fast (503) instead of hanging 6-7 s; the index of an answer is `header.revision` in its JSON body
  (what a put creates and what a member has applied), which raftlb turns into `X-Raft-Index`.

Over gRPC (being built: docs/protocol.md §11) the same per kind: etcd's leader calls carry `hasleader: true`
metadata, and the index of an answer is its ResponseHeader's revision (raftlb/core/etcdpb.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from raftlb.core import etcdpb
from raftlb.core.protowire import Buffer

# Bodies up to this size are held back to read their index (etcd answers to put/range/txn are small;
# watch streams are chunked and pass straight through).
BODY_INDEX_LIMIT = 64 * 1024


def etcd_revision(body: bytes) -> int | None:
    """`header.revision` of an etcd gateway answer (64-bit numbers are JSON strings), or None."""
    try:
        doc = json.loads(body)
        return int(doc["header"]["revision"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Dialect:
    write_headers: bytes = b""  # extra request header lines (each ending in CRLF) on writes
    index_from_body: Callable[[bytes], int | None] | None = None
    # gRPC calls: metadata added to calls for the leader; the index of an answer from its first message.
    leader_metadata: tuple[tuple[bytes, bytes], ...] = ()
    index_from_message: Callable[[Buffer], int | None] | None = None


DIALECTS: dict[str, Dialect] = {
    "native": Dialect(),
    "json": Dialect(),
    "etcd": Dialect(write_headers=b"grpc-metadata-hasleader: true\r\n", index_from_body=etcd_revision,
                    leader_metadata=etcdpb.LEADER_METADATA, index_from_message=etcdpb.response_revision),
}


def dialect_for(kind: str) -> Dialect:
    return DIALECTS.get(kind, DIALECTS["native"])
