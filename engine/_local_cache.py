"""The local cache: validated sessions kept in the process, dropped when Redis says so.

Opt-in (``local_cache_size > 0``). A hit answers ``validate`` without leaving the process;
the contract (README, "Local cache"):

- An entry is served only while (1) its node's tracker vouches for it (``fresh_until``:
  the last liveness probe sent + ``local_cache_max_staleness``), (2) the slot still maps
  to that node, and (3) before the moment the validate script would refresh its idle TTL
  (same slack rule), capped at the absolute deadline. So a hit never lets a session idle
  out in Redis while it is used, and never outlives either deadline.
- Any change to a cached key by any client reaches us as an invalidation message
  (engine/_transport/_tracking.py) and drops the entry; this process's own writes drop the
  user's entries at once (read-your-writes), before and after the write.
- A read whose reply races an invalidation is not stored: every invalidation (and local
  drop) appends the key's hash tag to a ring with a sequence number; a reply is stored
  only if no invalidation of its tag arrived since the read was sent.
- Memory is bounded by ``local_cache_size`` (LRU).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Final

from ._transport._tracking import Tracker, TrackerOwner

if TYPE_CHECKING:
    from ._models import Session
    from ._transport import Transport
    from ._transport._node import Node

__all__ = ["DROP_REASONS", "Entry", "LocalCache", "Ticket"]

_RING: Final = 4096  # invalidated tags remembered for the in-flight check

DROP_REASONS: Final = (
    "invalidated",  # the server said the key changed (any client, expiry, eviction)
    "write",  # this process wrote to the user's keys
    "evicted",  # LRU: the cache was full
    "expired",  # its refresh was due, or its absolute deadline came
    "moved",  # its slot is served by another node now
    "connection",  # a connection to its node was lost (tracking state is gone)
    "flush",  # the node flushed its data (FLUSHALL, a replica's full resync)
    "silent",  # the node did not answer a liveness probe in time
    "cluster_down",  # the node reported cluster_state:fail (cut off from the majority)
    "closed",  # the engine was closed
)


def tag_of(key: str) -> str:
    """The hash tag of one of our keys: ``prefix:{tag}:...``."""
    start = key.find("{") + 1
    return key[start : key.find("}", start)]


class Entry:
    """A cached session: what to answer, until when, and who vouches for it."""

    __slots__ = ("data", "session", "slot", "tag", "tracker", "until")

    def __init__(
        self, session: Session, data: bytes, until: float, tracker: Tracker, slot: int, tag: str
    ):
        self.session = session
        self.data = data  # the stored JSON: each hit parses its own copy
        self.until = until
        self.tracker = tracker
        self.slot = slot
        self.tag = tag


Ticket = tuple[Tracker, int, int, float]
"""Taken just before a read is sent: (tracker, its epoch, invalidation seq, send time)."""


class LocalCache(TrackerOwner):
    """Entries by Redis key (LRU), their index by hash tag, and one tracker per node."""

    def __init__(self, transport: Transport, size: int, max_staleness: float, slack: float):
        self.transport = transport
        self.size = size
        self.max_staleness = max_staleness
        self.keep = 1.0 - slack  # an entry is served while pttl > idle_ttl * keep
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.by_tag: dict[str, set[str]] = {}
        self.trackers: dict[Node, Tracker] = {}
        self.counts: Counter[Tracker] = Counter()  # entries per tracker (skip empty sweeps)
        self.seq = 0
        self._ring: list[str] = [""] * _RING
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.drops: Counter[str] = Counter()
        self.probe_period = max(0.01, max_staleness / 4)
        self._supervisor: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self.transport.connection_listeners.append(self._data_connection_lost)
        self._tick()
        self._supervisor = self.transport.loop.create_task(self._supervise())

    def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers.clear()
        self._clear("closed")

    async def _supervise(self) -> None:
        # One loop for every node: set tracking up where needed, probe liveness.
        while True:
            await asyncio.sleep(self.probe_period)
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        primaries = self.transport.primaries()
        for node in primaries:
            tracker = self.trackers.get(node)
            if tracker is None:
                tracker = self.trackers[node] = Tracker(self, node, self.max_staleness)
            tracker.tick(now)
        if len(self.trackers) > len(primaries):
            serving = set(primaries)
            for node in [n for n in self.trackers if n not in serving]:
                self.trackers.pop(node).close()  # no longer a primary: nothing to vouch for

    def _data_connection_lost(self, node: Node) -> None:
        tracker = self.trackers.get(node)
        if tracker is not None:
            tracker.data_connection_lost()

    # -- the read path ----------------------------------------------------------------

    def ticket(self, slot: int) -> Ticket | None:
        """Taken just before a read is sent; ``None`` if its reply may not be stored."""
        tracker = self.trackers.get(self.transport.node_for_slot(slot))
        if tracker is None or not tracker.ready:
            return None
        return tracker, tracker.epoch, self.seq, time.monotonic()

    def store(
        self,
        key: str,
        slot: int,
        session: Session,
        data: bytes,
        ticket: Ticket,
        pttl_ms: int,
        idle_ms: int,
    ) -> None:
        """Keep a validated session, unless anything may have changed since ``ticket``."""
        tracker, epoch, seq, sent_at = ticket
        if tracker.epoch != epoch or not tracker.ready:
            return
        if self.transport.node_for_slot(slot) is not tracker.node:
            return  # answered elsewhere (moved): that node vouches for nothing of ours
        tag = tag_of(key)
        if seq != self.seq and self._touched_since(tag, seq):
            return
        # Serve until the validate script would refresh it (pttl < idle * (1 - slack)),
        # counted from when the read was sent (the earliest it can have run).
        until = sent_at + (pttl_ms - idle_ms * self.keep) / 1000.0
        now = time.monotonic()
        until = min(until, now + session.absolute_expires_at.timestamp() - time.time())
        if until <= now:
            return
        entries = self.entries
        old = entries.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        entries[key] = Entry(session, data, until, tracker, slot, tag)
        keys = self.by_tag.get(tag)
        if keys is None:
            self.by_tag[tag] = {key}
        else:
            keys.add(key)
        self.counts[tracker] += 1
        if len(entries) > self.size:
            evicted, entry = entries.popitem(last=False)
            self._unindex(evicted, entry)
            self.drops["evicted"] += 1

    def expired(self, key: str, entry: Entry, now: float) -> None:
        """A looked-up entry that may not be served: drop it, counting why."""
        if self.entries.pop(key, None) is None:
            return
        self._unindex(key, entry)
        tracker = entry.tracker
        if now >= entry.until:
            reason = "expired"
        elif self.transport.node_for_slot(entry.slot) is not tracker.node:
            reason = "moved"
        else:
            reason = "silent"
        self.drops[reason] += 1

    def _touched_since(self, tag: str, seq: int) -> bool:
        gone = self.seq - seq
        if gone >= _RING:
            return True
        ring = self._ring
        return any(ring[i % _RING] == tag for i in range(seq, self.seq))

    # -- dropping ---------------------------------------------------------------------

    def _note(self, tag: str) -> None:
        self._ring[self.seq % _RING] = tag
        self.seq += 1

    def _unindex(self, key: str, entry: Entry) -> None:
        keys = self.by_tag.get(entry.tag)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_tag[entry.tag]
        self.counts[entry.tracker] -= 1

    def invalidated(self, keys: list[bytes]) -> None:
        """Keys the server says changed (from any node's subscriber)."""
        entries = self.entries
        for raw in keys:
            key = raw.decode("utf-8", "replace")
            self.invalidations += 1
            self._note(tag_of(key))
            entry = entries.pop(key, None)
            if entry is not None:
                self._unindex(key, entry)
                self.drops["invalidated"] += 1

    def forget_tag(self, tag: str) -> None:
        """This process writes to a user's keys: drop their sessions, refuse reads in flight."""
        self._note(tag)
        keys = self.by_tag.pop(tag, None)
        if not keys:
            return
        for key in keys:
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.counts[entry.tracker] -= 1
                self.drops["write"] += 1

    def drop_node(self, tracker: Tracker, reason: str) -> None:
        """Drop every entry a node vouched for (it may have changed them unseen). Reads in
        flight are kept out by the tracker (a new epoch, or no freshness left)."""
        if not self.counts.get(tracker):
            return
        doomed = [k for k, e in self.entries.items() if e.tracker is tracker]
        for key in doomed:
            entry = self.entries.pop(key)
            self._unindex(key, entry)
        self.drops[reason] += len(doomed)

    def _clear(self, reason: str) -> None:
        self.drops[reason] += len(self.entries)
        self.entries.clear()
        self.by_tag.clear()
        self.counts.clear()

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``EngineStats``."""
        return {
            "local_hits": self.hits,
            "local_misses": self.misses,
            "local_invalidations": self.invalidations,
            "local_entries": len(self.entries),
            "local_drops": {reason: self.drops.get(reason, 0) for reason in DROP_REASONS},
        }
