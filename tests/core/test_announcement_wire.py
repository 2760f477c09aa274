"""raft-announce/1 on the wire (raftlb.core.announcement, docs/protocol.md): which JSON objects are
announcements, the canonical form a `sig` signs, which signatures verify, and which `ts_ms` is recent."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import pytest

from raftlb.core.announcement import (
    MAX_UINT64,
    ROLES,
    Announcement,
    canonical_form,
    is_recent,
    is_uint64,
    sign,
    verify,
)

BASE: dict[str, Any] = {"node": "n1", "term": 5, "role": "follower"}


@dataclass(frozen=True)
class Parse:
    name: str
    doc: object
    want: Announcement | str  # the announcement, or the start of the ValueError's message


def with_(**fields: object) -> dict[str, object]:
    return {**BASE, **fields}


def without(name: str) -> dict[str, object]:
    return {k: v for k, v in BASE.items() if k != name}


PARSE = [
    Parse("the three required fields", BASE, Announcement("n1", 5, "follower")),
    Parse("every field", {"node": "n1", "term": 7, "role": "leader", "leader": "n1", "commit_index": 10,
                          "applied_index": 9, "has_quorum": True, "seq": 3, "ts_ms": 1764150000123},
          Announcement("n1", 7, "leader", "n1", 10, 9, True, 3, 1764150000123)),
    *[Parse(f"role {r}", with_(role=r), Announcement("n1", 5, r)) for r in ROLES],
    Parse("an empty leader means none", with_(leader=""), Announcement("n1", 5, "follower")),
    Parse("null optional fields mean absent", with_(leader=None, commit_index=None, applied_index=None,
                                                    has_quorum=None, seq=None, ts_ms=None),
          Announcement("n1", 5, "follower")),
    Parse("unknown keys (sig, extensions) are ignored", with_(sig="ab", extra={"x": 1}),
          Announcement("n1", 5, "follower")),
    Parse("term 0", with_(term=0), Announcement("n1", 0, "follower")),
    Parse("term 2**64-1, the largest uint64", with_(term=MAX_UINT64),
          Announcement("n1", MAX_UINT64, "follower")),
    Parse("indexes at 2**64-1", with_(applied_index=MAX_UINT64, ts_ms=MAX_UINT64),
          Announcement("n1", 5, "follower", applied_index=MAX_UINT64, ts_ms=MAX_UINT64)),
    Parse("not an object", [BASE], "announcement: must be a JSON object"),
    Parse("a string", "n1", "announcement: must be a JSON object"),
    Parse("no node", without("node"), "node: must be a non-empty string"),
    Parse("an empty node", with_(node=""), "node: must be a non-empty string"),
    Parse("a numeric node", with_(node=1), "node: must be a non-empty string"),
    Parse("no term", without("term"), "term: is required"),
    Parse("a null term", with_(term=None), "term: must be a non-negative integer below 2**64"),
    Parse("term true is no 1", with_(term=True), "term: must be a non-negative integer below 2**64"),
    Parse("a negative term", with_(term=-1), "term: must be a non-negative integer below 2**64"),
    Parse("term 2**64", with_(term=MAX_UINT64 + 1), "term: must be a non-negative integer below 2**64"),
    Parse("a 4299-digit term", with_(term=10**4298), "term: must be a non-negative integer below 2**64"),
    Parse("a float term", with_(term=5.0), "term: must be a non-negative integer below 2**64"),
    Parse("a string term", with_(term="5"), "term: must be a non-negative integer below 2**64"),
    Parse("no role", without("role"), "role: must be one of leader, follower, candidate, learner"),
    Parse("an unknown role", with_(role="boss"), "role: must be one of"),
    Parse("a role in capitals", with_(role="Leader"), "role: must be one of"),
    Parse("a numeric leader", with_(leader=2), "leader: must be a string or null"),
    Parse("has_quorum as a string", with_(has_quorum="true"), "has_quorum: must be a boolean or null"),
    Parse("commit_index 2**64", with_(commit_index=MAX_UINT64 + 1), "commit_index: must be a non-negative"),
    Parse("a negative applied_index", with_(applied_index=-3), "applied_index: must be a non-negative"),
    Parse("seq false", with_(seq=False), "seq: must be a non-negative"),
    Parse("a float ts_ms", with_(ts_ms=1.5), "ts_ms: must be a non-negative"),
]


@pytest.mark.parametrize("row", PARSE, ids=[r.name for r in PARSE])
def test_an_announcement_is_a_json_object_with_checked_fields(row: Parse) -> None:
    if isinstance(row.want, Announcement):
        ann = Announcement.from_json(row.doc)
        assert ann == row.want
        assert Announcement.from_json(ann.to_json()) == ann  # to_json is the inverse
        assert None not in ann.to_json().values()  # absent fields are left out
    else:
        with pytest.raises(ValueError) as info:
            Announcement.from_json(row.doc)
        assert str(info.value).startswith(row.want)


UINT64 = [(0, True), (1, True), (MAX_UINT64, True), (MAX_UINT64 + 1, False), (-1, False), (True, False),
          (False, False), (1.0, False), ("1", False), (None, False)]


@pytest.mark.parametrize(("value", "ok"), UINT64, ids=[repr(v) for v, _ in UINT64])
def test_a_uint64_is_a_json_integer_from_0_to_2_to_the_64_minus_1(value: object, ok: bool) -> None:
    assert is_uint64(value) is ok


KEY, OLD_KEY, OTHER_KEY = b"k" * 32, b"o" * 32, b"x" * 32
EVENT: dict[str, object] = {"node": "n1", "term": 5, "role": "leader", "leader": "n1", "seq": 9,
                            "ts_ms": 1764150000123}


def test_the_signed_form_is_the_event_without_sig_with_sorted_keys_and_no_spaces() -> None:
    form = b'{"leader":"n1","node":"n1","role":"leader","seq":9,"term":5,"ts_ms":1764150000123}'
    assert canonical_form(EVENT) == form
    assert canonical_form({**EVENT, "sig": "whatever"}) == form  # sig signs everything but itself
    assert canonical_form({"b": 1, "a": {"d": 2, "c": [1, 2]}}) == b'{"a":{"c":[1,2],"d":2},"b":1}'
    # sig is HMAC-SHA256 over that form, in lower-case hex: what a node implementer computes.
    assert sign(EVENT, KEY) == hmac.new(KEY, form, hashlib.sha256).hexdigest()
    assert sign({**EVENT, "sig": "stale"}, KEY) == sign(EVENT, KEY)


def signed(key: bytes, **changes: object) -> dict[str, object]:
    doc = {**EVENT, "sig": sign(EVENT, key)}
    doc.update(changes)
    return doc


@dataclass(frozen=True)
class Verify:
    name: str
    doc: object
    keys: tuple[bytes, ...]
    ok: bool


VERIFY = [
    Verify("signed with the key", signed(KEY), (KEY,), True),
    Verify("signed with the old key during a rotation", signed(OLD_KEY), (OLD_KEY, KEY), True),
    Verify("signed with the new key during a rotation", signed(KEY), (OLD_KEY, KEY), True),
    Verify("signed with another key", signed(OTHER_KEY), (OLD_KEY, KEY), False),
    Verify("no key configured verifies nothing", signed(KEY), (), False),
    Verify("no sig", dict(EVENT), (KEY,), False),
    Verify("a null sig", signed(KEY, sig=None), (KEY,), False),
    Verify("a numeric sig", signed(KEY, sig=12), (KEY,), False),
    Verify("a non-ASCII sig", signed(KEY, sig="é" * 64), (KEY,), False),
    Verify("the sig in upper case", signed(KEY, sig=sign(EVENT, KEY).upper()), (KEY,), False),
    Verify("a field changed after signing", signed(KEY, term=6), (KEY,), False),
    Verify("a field added after signing", signed(KEY, applied_index=1), (KEY,), False),
    Verify("not an object", [signed(KEY)], (KEY,), False),
]


@pytest.mark.parametrize("row", VERIFY, ids=[r.name for r in VERIFY])
def test_a_signed_event_verifies_under_any_configured_key(row: Verify) -> None:
    assert verify(row.doc, row.keys) is row.ok


NOW_MS = 1_764_150_000_000.0
RECENT = [
    ("now", int(NOW_MS), 2.0, True),
    ("within the skew, behind", int(NOW_MS) - 1999, 2.0, True),
    ("within the skew, ahead", int(NOW_MS) + 1999, 2.0, True),
    ("exactly the skew away", int(NOW_MS) - 2000, 2.0, True),
    ("older than the skew: a replay", int(NOW_MS) - 2001, 2.0, False),
    ("further ahead than the skew", int(NOW_MS) + 2001, 2.0, False),
    ("a wider skew takes it", int(NOW_MS) - 9000, 10.0, True),
    ("zero", 0, 2.0, False),
    ("2**64-1, far in the future", MAX_UINT64, 2.0, False),
    ("2**4000: no float, and no OverflowError", 2**4000, 2.0, False),
    ("negative", -1, 2.0, False),
    ("true", True, 2.0, False),
    ("a float", NOW_MS, 2.0, False),
    ("a string", str(int(NOW_MS)), 2.0, False),
    ("absent", None, 2.0, False),
]


@pytest.mark.parametrize(("name", "ts_ms", "skew", "ok"), RECENT, ids=[r[0] for r in RECENT])
def test_a_signed_event_is_recent_when_its_ts_ms_is_within_max_skew(name: str, ts_ms: object, skew: float,
                                                                     ok: bool) -> None:
    assert is_recent(ts_ms, NOW_MS, skew) is ok
