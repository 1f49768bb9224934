"""Prometheus metrics of a node (prometheus-client), read at scrape time.

Counters kept by the core (plain dict increments on the hot path) and the
sizes of the projections are exported by a custom collector when Prometheus
scrapes ``/metrics``; only the log append latency is a live histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REGISTER_OUTCOMES = ("ok", "challenged", "rejected", "423", "503")


def register_outcome(status: int) -> str:
    """The registration outcome label of a final response to a REGISTER."""
    if 200 <= status < 300:
        return "ok"
    if status in (401, 407):
        return "challenged"
    if status == 423:
        return "423"
    if status == 503:
        return "503"
    return "rejected"


class NodeCollector(Collector):
    """Exports the node's counters and projection sizes."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        counters: dict[str, int] = dict(node.core.counters)
        requests = CounterMetricFamily("siphon_sip_requests", "SIP requests received",
                                       labels=["method"])
        responses = CounterMetricFamily("siphon_sip_responses", "SIP responses sent",
                                        labels=["code"])
        regs = CounterMetricFamily("siphon_registrations", "REGISTER outcomes",
                                   labels=["outcome"])
        other = CounterMetricFamily("siphon_sip_events", "Other SIP-layer events",
                                    labels=["event"])
        for key, value in counters.items():
            if key.startswith("requests_"):
                requests.add_metric([key[len("requests_"):]], value)
            elif key.startswith("responses_"):
                responses.add_metric([key[len("responses_"):]], value)
            elif key.startswith("register_"):
                pass
            else:
                other.add_metric([key], value)
        for outcome in REGISTER_OUTCOMES:
            regs.add_metric([outcome], counters.get(f"register_{outcome}", 0))
        yield from (requests, responses, regs, other)

        state = node.runner.state
        yield GaugeMetricFamily("siphon_bindings", "Bindings in the projection",
                                value=state.binding_count())
        yield GaugeMetricFamily("siphon_aors", "AoRs with bindings in the projection",
                                value=len(state.aors))
        applied = CounterMetricFamily("siphon_projection_applied_events",
                                      "Log records applied to the projection")
        applied.add_metric([], node.runner.applied)
        yield applied
        lag = GaugeMetricFamily("siphon_consumer_lag", "Records in the log not yet applied",
                                labels=["partition"])
        for partition, end in sorted(node.log_end.items()):
            lag.add_metric([str(partition)], max(0, end - state.position.get(partition, 0)))
        yield lag
        failures = CounterMetricFamily("siphon_on_change_failures",
                                       "on_change callbacks that raised")
        failures.add_metric([], node.on_change_failures)
        yield failures
        trunks = GaugeMetricFamily("siphon_trunks", "Trunks by state", labels=["state"])
        now = time.time()
        live = sum(1 for e in node.runner.trunks.trunks.values() if e.lease_expires_at > now)
        trunks.add_metric(["live"], live)
        trunks.add_metric(["lapsed"], len(node.runner.trunks.trunks) - live)
        yield trunks
        forwarder = node.core.forwarder
        yield GaugeMetricFamily("siphon_proxy_branches", "Proxy branches held (in progress)",
                                value=len(forwarder.branches) if forwarder is not None else 0)
        yield GaugeMetricFamily("siphon_server_transactions", "Server transactions held",
                                value=len(node.core.transactions))
        yield GaugeMetricFamily("siphon_ready", "1 when the node serves SIP",
                                value=1 if node.core.ready and not node.core.draining else 0)


class Metrics:
    """The node's registry: the collector plus the append latency histogram."""

    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self.append_latency = Histogram(
            "siphon_log_append_seconds", "Log append latency (durable / acknowledged)",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))

    def observe_append(self) -> Callable[[float], None]:
        return self.append_latency.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
