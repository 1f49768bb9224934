"""server.udp_receive_buffer: the UDP listeners' SO_RCVBUF (bounds queueing under overload)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from siphon.config import ConfigError, parse_config
from siphon.transport import Transports

MINIMAL = 'listen:\n  udp: ["127.0.0.1:5060"]\ndomain:\n  local: [example.com]\n'


def test_default_and_configured_sizes() -> None:
    assert parse_config(MINIMAL, base_dir=Path("/etc")).server.udp_receive_buffer == 524288
    cfg = parse_config(MINIMAL + "server:\n  udp_receive_buffer: 131072\n", base_dir=Path("/etc"))
    assert cfg.server.udp_receive_buffer == 131072


def test_a_non_positive_size_names_the_key() -> None:
    with pytest.raises(ConfigError, match="udp_receive_buffer"):
        parse_config(MINIMAL + "server:\n  udp_receive_buffer: 0\n", base_dir=Path("/etc"))


async def test_listener_socket_gets_the_size() -> None:
    transports = Transports(lambda data, source: None, udp_receive_buffer=100_000)
    host, port = await transports.listen_udp("127.0.0.1", 0)
    try:
        sock = transports.udp[(host, port)].transport.get_extra_info("socket")  # type: ignore[union-attr]
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert 100_000 <= size <= 2 * 100_000  # (Linux reports twice what was asked)
    finally:
        await transports.close()
