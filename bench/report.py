"""Medians, the printed table, and the issue-7 targets with PASS/FAIL."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

TARGETS = ("direct", "haproxy", "raftlb")
METRICS = ("rps", "p50_us", "p99_us", "cpu_us_per_req", "peak_rss_mib")


def medians(runs: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """{concurrency: {target: {metric: median over rounds}}}; peak RSS is the maximum, not the median."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for conc in sorted({r["concurrency"] for r in runs}):
        out[conc] = {}
        for target in TARGETS:
            rows = [r for r in runs if r["concurrency"] == conc and r["target"] == target]
            if not rows:
                continue
            m = {k: statistics.median(r[k] for r in rows) for k in METRICS}
            m["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rows)
            m["errors"] = sum(r["errors"] for r in rows)
            m["disturbed"] = sum(bool(r.get("disturbed")) for r in rows)
            m["rounds"] = len(rows)
            out[conc][target] = m
    return out


def _fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 10_000 else f"{us:.0f} µs"


def table(med: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'conc':>5}  {'target':<15} {'req/s':>9} {'p50':>10} {'p99':>10} {'CPU µs/req':>11} "
             f"{'peak RSS':>9} {'errors':>6} {'disturbed':>9}"]
    for conc, by_target in med.items():
        lines.append("")
        for target, m in by_target.items():
            lines.append(f"{conc:>5}  {target:<15} {m['rps']:>9,.0f} {_fmt_us(m['p50_us']):>10} "
                         f"{_fmt_us(m['p99_us']):>10} {m['cpu_us_per_req']:>11.1f} "
                         f"{m['peak_rss_mib']:>6.1f} MB {int(m['errors']):>6} "
                         f"{int(m['disturbed']):>4}/{int(m['rounds'])}")
        rl = by_target.get("raftlb")
        for base in ("haproxy", "direct"):
            b = by_target.get(base)
            if rl is None or b is None:
                continue
            lines.append(f"{'':>5}  {'raftlb/' + base:<15} {rl['rps'] / b['rps']:>8.2f}x "
                         f"{rl['p50_us'] / b['p50_us']:>9.2f}x {rl['p99_us'] / b['p99_us']:>9.2f}x "
                         f"{rl['cpu_us_per_req'] / b['cpu_us_per_req']:>10.2f}x")
    return "\n".join(lines)


@dataclass
class Check:
    name: str
    passed: bool
    measured: str

    def line(self) -> str:
        return f"  {'PASS' if self.passed else 'FAIL'}  {self.name}: {self.measured}"


def checks(med: dict[int, dict[str, dict[str, float]]], hold: dict[str, Any] | None,
           rss_limit: float = 40.0, hold_rss_limit: float = 150.0) -> list[Check]:
    out: list[Check] = []

    def pair(conc: int, a: str, b: str) -> tuple[dict[str, float], dict[str, float]] | None:
        by = med.get(conc, {})
        return (by[a], by[b]) if a in by and b in by else None

    for conc in (64, 256):
        if p := pair(conc, "raftlb", "haproxy"):
            ratio = p[0]["rps"] / p[1]["rps"]
            out.append(Check(f"throughput >= 0.8x HAProxy at c={conc}", ratio >= 0.8,
                             f"{p[0]['rps']:,.0f} vs {p[1]['rps']:,.0f} req/s = {ratio:.2f}x"))
    for conc in med:
        if p := pair(conc, "raftlb", "haproxy"):
            ratio = p[0]["p99_us"] / p[1]["p99_us"]
            out.append(Check(f"p99 <= 1.5x HAProxy's at c={conc}", ratio <= 1.5,
                             f"{_fmt_us(p[0]['p99_us'])} vs {_fmt_us(p[1]['p99_us'])} = {ratio:.2f}x"))
    if p := pair(8, "raftlb", "direct"):
        added = p[0]["p50_us"] - p[1]["p50_us"]
        out.append(Check("added p50 over direct at c=8 <= 100 µs", added <= 100,
                         f"{_fmt_us(p[0]['p50_us'])} - {_fmt_us(p[1]['p50_us'])} = {added:.0f} µs"))
    peaks = [by["raftlb"]["peak_rss_mib"] for by in med.values() if "raftlb" in by]
    if peaks:
        out.append(Check(f"RSS <= {rss_limit:g} MB under load", max(peaks) <= rss_limit,
                         f"peak {max(peaks):.1f} MB"))
    if hold is not None and "raftlb" in hold:
        h = hold["raftlb"]
        ok = h["kept"] == h["requested"] and h["errors"] == 0 and h["peak_rss_mib"] <= hold_rss_limit
        out.append(Check(f"{h['requested']:,} keep-alive connections held, no errors, "
                         f"RSS <= {hold_rss_limit:g} MB", ok,
                         f"{h['kept']:,} kept, {h['errors']} errors, peak {h['peak_rss_mib']:.1f} MB"))
    return out
