"""The test harness, for the project's tests and for our users' own.

``LocalCluster`` starts a real cluster (or one plain server) of ``redis-server``
processes on loopback and gives a test kill, pause/resume, restart and failover;
``RemoteCluster`` drives a cluster someone else started, with commands only; the pytest
plugin (``engine.testing.plugin``) provides the fixtures. Needs redis-py (the ``testing``
extra); the library itself does not.
"""

from ._cluster import (
    DEFAULT_STATE_FILE,
    NODE_CONF,
    ClusterNode,
    HarnessError,
    LocalCluster,
    RedisServerNotFound,
)
from ._keyspace import delete_prefix, keys_under, primary_clients
from ._remote import RemoteCluster

__all__ = [
    "DEFAULT_STATE_FILE",
    "NODE_CONF",
    "ClusterNode",
    "HarnessError",
    "LocalCluster",
    "RedisServerNotFound",
    "RemoteCluster",
    "delete_prefix",
    "keys_under",
    "primary_clients",
]
