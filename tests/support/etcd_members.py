"""Fake etcd members: a JSON gateway answering `/v3/maintenance/status` and `/v3/cluster/member/list` from a
status captured from a real etcd 3.5.1 (tests/data/), and a recorder of what the pollers announce."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

from raftlb.core.leader_table import Announcement
from raftlb.http.app import Request, Response, json_response, serve
from raftlb.http.server import HttpServer

DATA = Path(__file__).resolve().parent.parent / "data"


def sample(name: str) -> dict[str, Any]:
    """One captured etcd answer from tests/data/."""
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


FOLLOWER = sample("etcd_status_follower.json")


class FakeMember:
    """An etcd JSON gateway answering status and member list from `status`; `hang` stalls status answers."""

    def __init__(self, name: str, member_id: str) -> None:
        self.name, self.member_id = name, member_id
        self.status: Any = copy.deepcopy(FOLLOWER)
        self.status["header"]["member_id"] = member_id
        self.hang = False
        self.members: list[dict[str, Any]] = []
        self.server: HttpServer | None = None
        self.polls = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self, port: int = 0) -> FakeMember:
        self.server = await serve(self.handle, "127.0.0.1", port, name=f"etcd-{self.name}")
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def handle(self, req: Request) -> Response:
        if req.path == "/v3/maintenance/status":
            self.polls += 1
            while self.hang:
                await asyncio.sleep(0.01)
            return json_response(self.status)
        if req.path == "/v3/cluster/member/list":
            return json_response({"header": self.status["header"], "members": self.members})
        return json_response({"error": "not found"}, 404)


def lead(members: list[FakeMember], leader: FakeMember, term: int) -> None:
    """Every member's status now names `leader` at `term`."""
    for m in members:
        m.status["leader"], m.status["raftTerm"] = leader.member_id, str(term)


class Recorder:
    """The callbacks pollers call: every announcement per node, and every down with its time."""

    def __init__(self) -> None:
        self.anns: dict[str, list[Announcement]] = {}
        self.downs: list[tuple[str, str, float]] = []

    def on_announcement(self, node_id: str, ann: Announcement) -> None:
        self.anns.setdefault(node_id, []).append(ann)

    def on_down(self, node_id: str, reason: str) -> None:
        self.downs.append((node_id, reason, time.monotonic()))

    def last(self, node_id: str) -> Announcement | None:
        return self.anns.get(node_id, [None])[-1]
