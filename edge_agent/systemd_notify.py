"""systemd's service notifications (READY, WATCHDOG, STOPPING) for `edge-agent run` under `Type=notify`.

A datagram to $NOTIFY_SOCKET (a leading `@` is Linux's abstract namespace); without the variable (not run by
systemd, or in a container) every call does nothing. Failures are logged, never raised: a missed watchdog ping
makes systemd restart the agent, which is the intended outcome of a hung agent, not of a logging problem.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1"); True when systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("ascii"))
    except OSError as exc:
        log.warning("systemd notify %r to %s failed: %s", state, address.lstrip("\0"), exc)
        return False
    return True
