"""What the nodes say about the cluster: ``INFO`` and ``CLUSTER NODES`` parsed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Role = Literal["primary", "replica"]


@dataclass(frozen=True)
class _NodeLine:
    """One parsed line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def role(self) -> Role:
        return "replica" if "slave" in self.flags else "primary"

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _parse_cluster_nodes(text: str) -> list[_NodeLine]:
    """Parse ``CLUSTER NODES`` output (see https://redis.io/commands/cluster-nodes/)."""
    result = []
    for raw in text.splitlines():
        fields = raw.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port_text = address.rpartition(":")
        slots: list[tuple[int, int]] = []
        for token in fields[8:]:
            if token.startswith("["):  # importing/migrating marker, not an owned slot
                continue
            lo, _, hi = token.partition("-")
            slots.append((int(lo), int(hi or lo)))
        result.append(
            _NodeLine(
                node_id=fields[0],
                host=host,
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                slots=tuple(slots),
            )
        )
    return result


def _myself(lines: Iterable[_NodeLine] | None) -> _NodeLine | None:
    for line in lines or ():
        if "myself" in line.flags:
            return line
    return None
