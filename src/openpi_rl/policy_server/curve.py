"""CURVE for the policy server's ROUTER socket (guarantee 7): the server's key pair and an
allow-list of the robots' public keys (`openpi-rl keys generate DIR`). One ZAP handler
(pyzmq's ThreadAuthenticator) serves a context; each socket gets its own domain, so several
servers in one process keep separate allow-lists. An unknown key is refused at the handshake.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any

import structlog
import zmq

log = structlog.get_logger("openpi_rl.policy_server")

_CURVE_DOMAINS = itertools.count()
_AUTHENTICATORS: dict[int, Any] = {}  # id(context) -> its one ZAP handler (ThreadAuthenticator)
_AUTH_LOCK = threading.Lock()


def curve_server(socket: zmq.Socket, secret_key_file: str, allowed_clients_dir: str) -> str:
    """Make `socket` (not yet bound) a CURVE server that admits only the public keys in
    `allowed_clients_dir`. One ZAP handler serves the context; each socket has its own domain,
    so several servers in one process keep separate allow-lists. Returns the domain."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if not secret:
        raise ValueError(f"curve_secret_key_file: {secret_key_file} holds no secret key")
    if not os.path.isdir(allowed_clients_dir):
        raise ValueError(f"curve_allowed_clients_dir: {allowed_clients_dir} is not a directory")
    ctx = socket.context
    with _AUTH_LOCK:
        auth = _AUTHENTICATORS.get(id(ctx))
        if auth is None:
            auth = _AUTHENTICATORS[id(ctx)] = ThreadAuthenticator(ctx, log=_zap_log())
            auth.start()
        domain = f"openpi-rl-{next(_CURVE_DOMAINS)}"
        auth.configure_curve(domain=domain, location=allowed_clients_dir)
    socket.zap_domain = domain.encode()
    socket.curve_server = True
    socket.curve_publickey, socket.curve_secretkey = public, secret
    log.info("curve on", allowed=len(zmq.auth.load_certificates(allowed_clients_dir)))
    return domain


def _zap_log() -> Any:
    zap = logging.getLogger("openpi_rl.policy_server.zap")  # refusals: debug, never keys
    zap.setLevel(logging.WARNING)
    return zap
