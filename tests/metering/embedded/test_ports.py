"""free_port: ports a server can bind, away from where client sockets and other servers are."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from metering.embedded import ports
from metering.embedded.ports import free_port


def _ephemeral() -> tuple[int, int]:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return lo, hi


def test_ports_are_distinct_listenable_and_outside_the_ephemeral_range() -> None:
    lo, hi = _ephemeral()
    given = [free_port() for _ in range(200)]
    assert len(set(given)) == len(given)
    assert all(not lo <= p <= hi for p in given), "a client socket could take one of these"
    servers = []
    try:
        for p in given[:20]:  # what the caller does next: bind and listen
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            servers.append(s)
            s.bind(("127.0.0.1", p))
            s.listen()
    finally:
        for s in servers:
            s.close()


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        # a range of two ports, one of them listening: only the other may come back
        monkeypatch.setattr(ports, "_candidates", lambda: (taken, taken + 1))
        for _ in range(20):  # drawn at random: each time, not by luck
            monkeypatch.setattr(ports, "_given", set())
            assert free_port() == taken + 1
        # both gone now (one listening, one handed out): the kernel chooses
        other = free_port()
        assert other not in (taken, taken + 1)


def test_no_room_outside_the_ephemeral_range_falls_back_to_the_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL", wide)
    assert ports._candidates() is None
    given = [free_port() for _ in range(20)]
    assert len(set(given)) == 20
    assert all(1024 <= p <= 65535 for p in given)
