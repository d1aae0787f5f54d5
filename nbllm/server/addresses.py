"""Which host names and addresses belong to this machine alone (loopback).

No web framework here: the options check the address the server listens on with it (anything
but loopback needs an API key), the access checks the ``Host`` and ``Origin`` of requests.
"""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is only reachable from this machine."""
    name = host.strip().strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def is_literal_loopback(host: str | None) -> bool:
    """Loopback without asking DNS (a Host or Origin header: DNS is what an attacker controls)."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
