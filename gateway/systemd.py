"""sd_notify and the systemd watchdog, with the standard library only.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket, named by a
path, or by a name in the abstract namespace when it starts with ``@``. A notification is one
datagram of newline-separated ``KEY=VALUE`` assignments:

- ``READY=1`` once the listeners are bound (systemd holds back units ordered after us until
  then, and kills us if it does not come within ``TimeoutStartSec``);
- ``RELOADING=1`` with ``MONOTONIC_USEC=…`` when a reload starts, ``READY=1`` when it is done;
- ``STOPPING=1`` when the drain starts; ``STATUS=…`` free text for ``systemctl status``;
- ``WATCHDOG=1`` at least every ``watchdog_interval()`` seconds, from the event loop, so that
  a stuck loop stops the pings and systemd restarts the service.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op returning False. Nothing here
raises: a failure is logged at DEBUG and reported by the return value, since a lost
notification must not take the gateway down (systemd's own timeouts act on a missing READY
or WATCHDOG). One unbound datagram socket is created on first use and kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

__all__ = ["close", "notify", "reloading", "watchdog_interval"]

log = logging.getLogger("iotgw.systemd")

SEND_TIMEOUT_S = 1.0
"""How long a send may block when systemd's queue is full: it must not stall the loop long."""

_lock = threading.Lock()
_socket: socket.socket | None = None


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=draining"``) as one notification.

    A newline inside a state would start another assignment, so it is sent as a space.
    Returns True if the datagram was sent, False outside systemd or on failure.
    """
    global _socket
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:  # e.g. vsock:CID:PORT (systemd ≥ 254, for VMs): not used on a gateway host
        log.debug("sd_notify: unsupported NOTIFY_SOCKET address %r", address)
        return False
    payload = "\n".join(state.replace("\n", " ") for state in states).encode("utf-8", "replace")
    try:
        with _lock:
            if _socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT_S)
                _socket = sock
            _socket.sendto(payload, target)
    except OSError as err:
        log.debug("sd_notify %r to %s failed: %s", payload[:80], address, err)
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` stamp that systemd ≥ 253 requires."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None.

    None when the watchdog is off, or when ``$WATCHDOG_PID`` names another process (the
    variables were inherited by a child).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        interval_usec = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        log.debug("watchdog: ignoring WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
    if interval_usec <= 0:
        return None
    return interval_usec / 2_000_000


def close() -> None:
    """Close the notification socket (a later ``notify`` opens a new one)."""
    global _socket
    with _lock:
        sock, _socket = _socket, None
    if sock is not None:
        sock.close()
