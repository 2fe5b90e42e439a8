"""``engine.cluster``: where the harness used to live; ``engine.testing`` is its home now.

Kept so ``from engine.cluster import LocalCluster`` (the README's import until now) goes on
working; new code imports from ``engine.testing``.
"""

from .testing import (
    DEFAULT_STATE_FILE,
    NODE_CONF,
    ClusterNode,
    HarnessError,
    LocalCluster,
    RedisServerNotFound,
)

__all__ = [
    "DEFAULT_STATE_FILE",
    "NODE_CONF",
    "ClusterNode",
    "HarnessError",
    "LocalCluster",
    "RedisServerNotFound",
]
