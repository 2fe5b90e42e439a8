"""The harness's constants and errors, shared by its modules."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

NODE_CONF: Path = Path(__file__).resolve().parent.parent / "redis-node.conf"
"""The shared node configuration every harness node includes (also mounted by docker/)."""

DEFAULT_STATE_FILE: Path = Path(".engine-cluster") / "state.json"
"""Where ``python -m engine cluster`` keeps track of the nodes it started."""

SERVER_VARIABLE = "ENGINE_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` the harness runs when none is passed
(CI runs the cluster suite once on Debian's Redis 7.0 and once with this set to a Redis
8.x); default: ``redis-server`` on ``PATH``."""

TOTAL_SLOTS = 16384
BUS_PORT_OFFSET = 10000
_STATE_VERSION = 1
_CONTROL_TIMEOUT = 1.0
_STOP_GRACE = 3.0
_BIND_ATTEMPTS = 3
_INSTALL_HINT = "apt-get install redis-server redis-tools"
_BIND_ERRORS = ("Address already in use", "Failed listening on port", "Could not bind")

Role = Literal["primary", "replica"]
FailoverMode = Literal["force", "takeover"]


class HarnessError(RuntimeError):
    """The local cluster could not be started, reached, or brought into the requested state."""


class RedisServerNotFound(HarnessError):
    """No usable ``redis-server`` executable was found."""
