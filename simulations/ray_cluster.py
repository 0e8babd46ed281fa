"""Attaching a simulation to a Ray cluster that is already running (``--ray-address``).

``ray.init(address=...)`` waits a long time for a cluster that is not there; this checks first,
in a few seconds, so a wrong address is one line rather than a hang.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from simulations.config import ConfigError

CONNECT_TIMEOUT = 3.0


def resolve_address(address: str) -> str:
    """``auto`` the way Ray reads it: ``RAY_ADDRESS``, else the cluster this machine started last."""
    if address != "auto":
        return address
    from_env = os.environ.get("RAY_ADDRESS", "")
    if from_env and from_env != "auto":
        return from_env
    current = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip():
        return current.read_text().strip()
    raise ConfigError("--ray-address auto: no running Ray cluster found on this machine "
                      "(start one with `ray start --head`, or give its address)")


def check_reachable(address: str) -> str:
    """The resolved address, if something listens there; ``ConfigError`` in one line otherwise."""
    resolved = resolve_address(address)
    host_port = resolved.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {resolved}: {exc.strerror or exc}") from None
    return resolved
