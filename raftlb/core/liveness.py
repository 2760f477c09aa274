"""The liveness rule, in one place: a node is live while it was heard within the liveness timeout.

Pure: the caller passes `now` from one clock (the control plane and the leader table both use
`time.monotonic`, so a node the follower reports up is the node the table counts as live). The leader
table, the announce-stream follower and the status poller all judge by these two functions.
"""

from __future__ import annotations


def is_live(last_heard: float | None, now: float, timeout: float) -> bool:
    """Heard at `last_heard` (None: never) and `now` at most `timeout` seconds later. The last moment of
    liveness, `last_heard + timeout`, still counts as live."""
    return last_heard is not None and now <= last_heard + timeout


def live_until(last_heard: float, timeout: float) -> float:
    """The last moment at which a node heard at `last_heard` is still live: after it, `is_live` is False
    unless the node is heard again."""
    return last_heard + timeout
