"""The policy server's admin protocol from the caller's side: one request, one reply, on the
server's ZMQ ROUTER admin endpoint (`openpi-rl admin`, `openpi-rl eval --robots`). The server's
side is `openpi_rl.policy_server.admin`."""

from __future__ import annotations

from typing import Any

import zmq

from openpi_rl_client import wire


def admin_request(
    endpoint: str,
    token: str,
    command: str,
    version: int | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Send one admin command and return the reply (raises TimeoutError when none comes)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        msg: dict[str, Any] = {"token": token, "command": command}
        if version is not None:
            msg["version"] = version
        sock.send_multipart([b"", wire.packb(msg)])
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"{endpoint}: no admin reply to {command!r} within {timeout_s} s")
        return wire.unpackb(sock.recv_multipart()[-1])
    finally:
        sock.close(linger=0)


__all__ = ["admin_request"]
