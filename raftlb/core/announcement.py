"""raft-announce/1 on the wire: the `Announcement` a node sends, how its JSON object is checked, and how it is
signed (docs/protocol.md).

Pure: no I/O and no clock of its own (the replay check takes the wall clock's `now_ms` from its caller).

- Fields: `node` (non-empty string), `term` (required), `role` (one of ROLES), `leader` (a node id, or
  null/empty for none), `commit_index`, `applied_index`, `has_quorum` (boolean or null), `seq`, `ts_ms`.
  Terms, indexes, `seq` and `ts_ms` are JSON integers from 0 to 2**64-1 (etcd's uint64); anything else is
  refused, so every accepted value converts to a float (metrics) and prints. Unknown keys are ignored.
- Signing (`announce_auth`): `sig` is HMAC-SHA256, in lower-case hex, over the event without `sig`,
  serialized as JSON with sorted keys and no spaces (`canonical_form`). Any of the configured keys verifies
  (two during a rotation).
- Replay: a signed event whose `ts_ms` is further than `max_skew` seconds from the receiver's wall clock is
  refused, so an old recording replayed on a new connection is not taken (`seq` rising on one stream is the
  other half, checked by the stream follower).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TypeGuard

# ROLES is re-exported: the roles are named in the config too (a `json` cluster's role map).
from raftlb.config.model import ROLES as ROLES

MAX_UINT64 = 2**64 - 1  # the largest term or index accepted (etcd's terms and revisions are uint64)


def is_uint64(value: object) -> TypeGuard[int]:
    """A JSON integer from 0 to 2**64-1. `true` is no 1 (bool is an int subclass in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT64


def uint64_field(doc: Mapping[str, object], name: str, *, required: bool = False) -> int | None:
    """The uint64 field `name` of a decoded object; None when absent or null and not required. ValueError
    names the field otherwise."""
    if name not in doc and required:
        raise ValueError(f"{name}: is required")
    value = doc.get(name)
    if value is None and not required:
        return None
    # A 4299-digit integer is valid JSON but no float (metrics) and no Raft term: the range is a uint64's.
    if not is_uint64(value):
        raise ValueError(f"{name}: must be a non-negative integer below 2**64")
    return value


@dataclass(frozen=True, slots=True)
class Announcement:
    """One raft-announce/1 event (or one /raft/status answer) from one node."""

    node: str
    term: int
    role: str  # one of ROLES
    leader: str | None = None  # the node's view of the leader id
    commit_index: int | None = None
    applied_index: int | None = None
    has_quorum: bool | None = None  # the leader's own view; None when not reported
    seq: int | None = None
    ts_ms: int | None = None

    @classmethod
    def from_json(cls, doc: object) -> Announcement:
        """Validate a decoded JSON object strictly; ValueError names the first bad field.

        Unknown keys (e.g. `sig`, which `verify` checks) are ignored; an empty `leader` means none.
        """
        if not isinstance(doc, dict):
            raise ValueError("announcement: must be a JSON object")
        node = doc.get("node")
        if not isinstance(node, str) or not node:
            raise ValueError("node: must be a non-empty string")
        term = uint64_field(doc, "term", required=True)
        assert term is not None  # required=True never returns None
        role = doc.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}")
        leader = doc.get("leader")
        if leader is not None and not isinstance(leader, str):
            raise ValueError("leader: must be a string or null")
        has_quorum = doc.get("has_quorum")
        if has_quorum is not None and not isinstance(has_quorum, bool):
            raise ValueError("has_quorum: must be a boolean or null")
        return cls(
            node=node,
            term=term,
            role=role,
            leader=leader or None,
            commit_index=uint64_field(doc, "commit_index"),
            applied_index=uint64_field(doc, "applied_index"),
            has_quorum=has_quorum,
            seq=uint64_field(doc, "seq"),
            ts_ms=uint64_field(doc, "ts_ms"),
        )

    def to_json(self) -> dict[str, object]:
        """The wire form, omitting fields that are None (the inverse of `from_json`)."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in doc.items() if v is not None}


def canonical_form(doc: Mapping[str, object]) -> bytes:
    """What `sig` signs: the event without `sig`, as JSON with sorted keys and no spaces."""
    body = json.dumps({k: v for k, v in doc.items() if k != "sig"}, sort_keys=True, separators=(",", ":"))
    return body.encode()


def sign(doc: Mapping[str, object], key: bytes) -> str:
    """The `sig` of an event: HMAC-SHA256 (lower-case hex) of its canonical form under `key`."""
    return hmac.new(key, canonical_form(doc), hashlib.sha256).hexdigest()


def verify(doc: object, keys: Iterable[bytes]) -> bool:
    """The decoded event carries a `sig` that one of `keys` made (during a rotation both the old and the new
    key are accepted). Constant-time per key."""
    if not isinstance(doc, dict):
        return False
    sig = doc.get("sig")
    # compare_digest raises TypeError on a non-ASCII str: such a sig is simply wrong.
    if not isinstance(sig, str) or not sig.isascii():
        return False
    return any(hmac.compare_digest(sig, sign(doc, key)) for key in keys)


def is_recent(ts_ms: object, now_ms: float, max_skew: float) -> bool:
    """A signed event's `ts_ms` is a uint64 within `max_skew` seconds of the receiver's wall clock `now_ms`:
    else it is refused as a replay."""
    # (Range first: an int too large for a float would raise OverflowError in the subtraction.)
    return is_uint64(ts_ms) and abs(now_ms - ts_ms) <= max_skew * 1000
