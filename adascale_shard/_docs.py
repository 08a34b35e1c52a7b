"""Where each error and warning is explained: its entry in docs/troubleshooting.md."""

from __future__ import annotations

__all__ = ["see"]


def see(anchor: str) -> str:
    """The pointer appended to a message: `` (see docs/troubleshooting.md#<anchor>)``, the path
    relative to the adascale-shard repository (tests/unit/test_error_links.py checks the anchors)."""
    return f" (see docs/troubleshooting.md#{anchor})"
