"""Auto-pipelining transport for Redis Cluster and single Redis servers.

The transport knows slots, nodes and the RESP protocol; it does not know what a session is.
Three layers, one module each: ``_connection`` (one socket: coalesced writes, replies in
order, group WAIT), ``_node`` (a node's connections and circuit breaker), ``_routing``
(slot map, redirects, retries, deadlines, watchdog, bulk rounds; the only place where a
failed command becomes a public error).

How a command travels::

    call(slot, packed)            packed = one RESP command (hiredis.pack_command)
      -> node = slot map[slot]    one long-lived connection per node
      -> conn.send(packed)        appended to the connection's write buffer; the first
                                  command of a loop tick schedules one flush, so every
                                  command issued in the same tick for that node goes out
                                  in ONE write()  (implicit pipelining)
      <- data_received            hiredis parses replies, matched to waiters in order
      -> redirects and retries    MOVED: fix that slot, retry at once (a burst of MOVED
                                  triggers one topology refresh); ASK: ASKING + command on
                                  the target's connection; TRYAGAIN / CLUSTERDOWN / LOADING:
                                  backoff with jitter; NOSCRIPT: EVAL with the source once

Every call carries one deadline covering all its retries. A watchdog (one timer for the
whole transport, not one per call) fails commands whose deadline passed. A node whose
connection is refused, or that lets several timeouts pass without answering anything,
gets its circuit breaker opened: calls to its slots fail at once with ``EngineUnavailable``
until a half-open probe (connect + PING) succeeds, and the slot map is refreshed meanwhile,
so a promoted replica takes over without restarting anything. Calls to other nodes never
wait behind a dead one.
"""

from ._connection import CallFailed, Reply, pack
from ._routing import Transport, TransportOptions, evalsha_to_eval

__all__ = ["CallFailed", "Reply", "Transport", "TransportOptions", "evalsha_to_eval", "pack"]
