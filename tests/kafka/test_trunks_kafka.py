"""The built-in trunk registry on the Kafka log: every node sees the same trunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.integration.conftest import SiphonProcess, free_port, siphon_factory  # noqa: F401
from tests.integration.test_http_trunks import call

pytestmark = [pytest.mark.kafka, pytest.mark.integration]


@pytest.mark.timeout(120)
def test_put_on_one_node_get_on_the_other(kafka_broker: dict[str, str],
                                          siphon_factory: Any) -> None:  # noqa: F811
    topic = f"siphon.trunks.{uuid.uuid4().hex[:8]}"
    kafka = {"backend": "kafka", "kafka": {
        "bootstrap_servers": [kafka_broker["KAFKA_BOOTSTRAP"]], "topic": topic,
        "partitions": 3, "group_id": f"g-{topic}"}}
    nodes: list[tuple[SiphonProcess, int]] = []
    for name in ("a", "b"):
        port = free_port()
        node = siphon_factory(name)
        node.start({"registrar": kafka, "server": {"instance_id": f"node-{name}"},
                    "http": {"listen": f"127.0.0.1:{port}"}, "trunks": {"enabled": True}},
                   script_text="", timeout=60)
        nodes.append((node, port))
    (_, port_a), (_, port_b) = nodes
    status, _, _ = call(port_a, "PUT", "/trunks/carrier-a",
                        '{"sip_uri": "sip:sbc-a.example.net", "transport": "tls"}')
    assert status == 201
    deadline = time.monotonic() + 5
    while True:
        status, _, body = call(port_b, "GET", "/trunks/carrier-a")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and json.loads(body)["transport"] == "tls"
    # a heartbeat on B for the trunk registered on A, then a delete on B seen on A
    assert call(port_b, "PATCH", "/trunks/carrier-a")[0] == 204
    assert call(port_b, "DELETE", "/trunks/carrier-a")[0] == 204
    deadline = time.monotonic() + 5
    while call(port_a, "GET", "/trunks/carrier-a")[0] != 404:
        assert time.monotonic() < deadline, "the deletion on B never reached A"
        time.sleep(0.05)
    _, _, body = call(port_a, "GET", "/trunks")
    assert json.loads(body) == {"trunks": []}
