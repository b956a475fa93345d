"""mignet: move guest memory between hosts as fast as the wire allows, in QEMU's stream format."""

from __future__ import annotations

__version__ = "0.1.0"
