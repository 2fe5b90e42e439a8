"""The test harness, for the project's tests and for our users' own.

``LocalCluster`` starts a real cluster (or one plain server) of ``redis-server``
processes on loopback and gives a test kill, pause/resume, restart and failover;
``LocalCluster(netns=True)`` puts every node in a network namespace of its own, so
``LocalCluster.partitions`` can cut the network between them;
``RemoteCluster`` drives a cluster someone else started, with commands only;
``delete_prefix`` / ``keys_under`` clean up and inspect a key prefix on every primary; the
pytest plugin (``engine.testing.plugin``, registered as a ``pytest11`` entry point)
provides the ``redis_cluster`` and ``session_engine`` fixtures.

Needs redis-py (the ``testing`` extra), which the library itself does not: the names are
imported on first use, so pytest can load the plugin where redis-py is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cluster import (
        DEFAULT_STATE_FILE,
        NODE_CONF,
        ClusterNode,
        HarnessError,
        LocalCluster,
        RedisServerNotFound,
    )
    from ._keyspace import delete_prefix, keys_under, primary_clients
    from ._netns import NETNS_SUBNET, NetnsUnavailable, Partitions, netns_unavailable
    from ._remote import RemoteCluster
    from ._tls import TlsFiles, make_test_pki

__all__ = [
    "DEFAULT_STATE_FILE",
    "NETNS_SUBNET",
    "NODE_CONF",
    "ClusterNode",
    "HarnessError",
    "LocalCluster",
    "NetnsUnavailable",
    "Partitions",
    "RedisServerNotFound",
    "RemoteCluster",
    "TlsFiles",
    "delete_prefix",
    "keys_under",
    "make_test_pki",
    "netns_unavailable",
    "primary_clients",
    "until_tracking_ready",
]

_HOME = {
    "DEFAULT_STATE_FILE": "._cluster",
    "NODE_CONF": "._cluster",
    "ClusterNode": "._cluster",
    "HarnessError": "._cluster",
    "LocalCluster": "._cluster",
    "NETNS_SUBNET": "._netns",
    "NetnsUnavailable": "._netns",
    "Partitions": "._netns",
    "netns_unavailable": "._netns",
    "RedisServerNotFound": "._cluster",
    "RemoteCluster": "._remote",
    "TlsFiles": "._tls",
    "delete_prefix": "._keyspace",
    "keys_under": "._keyspace",
    "make_test_pki": "._tls",
    "primary_clients": "._keyspace",
    "until_tracking_ready": "._local_cache",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
