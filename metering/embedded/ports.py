"""Free loopback ports for servers started by the project.

A port is handed out before its server binds it, so two things could take it in between:

* an outgoing connection: the kernel gives client sockets source ports from its ephemeral
  range (``net.ipv4.ip_local_port_range``), and a port found free by binding port 0 comes
  from that same range. The test suite opens thousands of Kafka and ClickHouse connections
  while servers start, so ports are drawn from below that range, where no client socket is
  ever placed;
* another process starting a server at the same moment (pytest-xdist runs two): ports are
  drawn at random from about ten thousand, and a port already bound fails the check.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from metering.errors import EmbeddedServerError

__all__ = ["free_port"]

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
# well clear of the registered ports most local services use (5432, 6379, 8080, 9000 ...)
_LOWEST = 20_000
_TRIES = 200

# handed out by this process: a server may not have bound its port yet (ClickHouse takes two)
_given: set[int] = set()


def _candidates() -> tuple[int, int] | None:
    """The range to draw from (inclusive): below the ephemeral range, else above it; None
    when neither leaves room."""
    try:
        lo, hi = (int(x) for x in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        lo, hi = 32_768, 60_999  # Linux's default
    if lo - 1 - _LOWEST >= 1_000:
        return _LOWEST, lo - 1
    if 65_535 - (hi + 1) >= 1_000:
        return hi + 1, 65_535
    return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the kernel's ephemeral
    range where it can (see the module doc), and not handed out before by this process."""
    span = _candidates()
    if span is not None:
        lo, hi = span
        for _ in range(_TRIES):
            port = lo + secrets.randbelow(hi - lo + 1)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    # no room outside the ephemeral range, or nothing free in it: let the kernel choose
    for _ in range(_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise EmbeddedServerError("no free TCP port on 127.0.0.1")
