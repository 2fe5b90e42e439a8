"""Free loopback ports for a cluster: the client port and its bus port (+10000) both free,
below the kernel's ephemeral range so a restarted node gets its port back."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from ._constants import BUS_PORT_OFFSET, HarnessError


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_window() -> tuple[int, int]:
    # Prefer ports whose bus port (+10000) stays below the kernel's ephemeral range: after a
    # kill, an outgoing connection could otherwise grab the freed port and break restart().
    low, high = 20000, _ephemeral_low() - BUS_PORT_OFFSET
    if high - low >= 1000:
        return low, high
    return 30000, 50000


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, port + BUS_PORT_OFFSET):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                return False
    return True


def _pick_ports(host: str, count: int, taken: set[int]) -> list[int]:
    """``count`` ports p with p and p+10000 free and clear of every port in ``taken``."""
    low, high = _port_window()
    # SystemRandom: tests often seed the global RNG, which would make parallel runs collide.
    rng = random.SystemRandom()
    reserved = {p + d for p in taken for d in (0, BUS_PORT_OFFSET)}
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count:
            break
        port = rng.randrange(low, high)
        if port in reserved or port + BUS_PORT_OFFSET in reserved:
            continue
        if _port_free(host, port):
            ports.append(port)
            reserved.update((port, port + BUS_PORT_OFFSET))
    if len(ports) < count:
        raise HarnessError(f"could not find {count} free port pairs in {low}-{high}")
    return ports
