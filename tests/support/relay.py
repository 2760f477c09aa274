"""The relay's first home; it grew into `faults.FaultRelay` (modes, latency, partitions, flapping)."""

from __future__ import annotations

from tests.support.faults import FaultRelay as Relay

__all__ = ["Relay"]
