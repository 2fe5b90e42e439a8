"""The life cycle shared by the engine and its transport: new, open, closed (for good)."""

from __future__ import annotations

import enum

__all__ = ["State"]


class State(enum.Enum):
    """``NEW`` until opened; ``CLOSED`` is final, so closing twice is a no-op."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"
