"""Free TCP ports for the private Ray session and DeepSpeed's local rendezvous."""

from __future__ import annotations

import socket

HEAD_PORTS = frozenset({6379, 8265, 52365, 52366, 10001, 8080})  # Ray's and cluster/local_head.sh's defaults


def free_port() -> int:
    """A port free now, never one of :data:`HEAD_PORTS` (52365/52366 lie in Linux's ephemeral range)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in HEAD_PORTS:
            return port
