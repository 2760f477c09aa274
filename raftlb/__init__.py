"""raftlb: a leader-aware load balancer / reverse proxy for Raft clusters."""

__version__ = "0.1.0"
