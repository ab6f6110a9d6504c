"""The operator's admin endpoint (guarantee 7: loopback and a token): a ZMQ ROUTER on its own
thread, so a pin that loads a version never touches the serving loop.

Request (msgpack, `openpi_rl_client.wire`): `{"token": str, "command": str, "version"?: int}`.
Commands: `status`, `pin` (with `version`), `unpin`, `rollback`, `pause-learning`,
`resume-learning`. Pin and rollback act on this server; pause and resume set the switch the
learner reads from the server's `health` replies (within its 0.25 s poll). Each decision is
persisted in the checkpoint directory (operator_state.json) and survives restarts; the learner
trains on from a rollback's target.
Reply: `{"ok": true, "status": {...}}`, or `{"error": {"code", "message"}}` with a code from
`openpi_rl_client.protocol` (`unauthorized`, `bad_message`, `invalid_field`, `internal`). Bad
input gets an error reply; nothing an admin sends stops the server. The token is compared in
constant time and never logged. Each connection has a token bucket (`rate_limit_per_s`): a
request over it gets `overloaded` without being decoded, so guessing tokens is slow.

CLI: `openpi-rl admin status|pin N|unpin|rollback|pause-learning|resume-learning
[--endpoint tcp://127.0.0.1:5559] [--token T]` (default token: $OPENPI_RL_ADMIN_TOKEN).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from openpi_rl.guards import RateLimiter
from openpi_rl_client import protocol, wire
from openpi_rl_client.admin import admin_request

if TYPE_CHECKING:
    from openpi_rl.policy_server.swapper import Swapper

log = structlog.get_logger("openpi_rl.policy_server.admin")

COMMANDS = ("status", "pin", "unpin", "rollback", "pause-learning", "resume-learning")
TOKEN_ENV = "OPENPI_RL_ADMIN_TOKEN"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5559"
MAX_REQUEST_BYTES = 64 * 1024


class AdminEndpoint:
    """`AdminEndpoint(swapper, endpoint, token).start()`; `close()` stops it. `endpoint` is the
    bound address once constructed (port 0 / `*` resolved)."""

    def __init__(
        self,
        swapper: Swapper,
        endpoint: str,
        token: str,
        rate_limit_per_s: float = 50.0,
        rate_limit_burst: int = 100,
        handshake_timeout_s: float = 5.0,
    ):
        if not token:
            raise ValueError("admin token: expected a non-empty str")
        self.swapper = swapper
        self._token = token.encode()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_REQUEST_BYTES)
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, int(handshake_timeout_s * 1000))
        self._limiter = RateLimiter(rate_limit_per_s, rate_limit_burst)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="admin", daemon=True)

    def start(self) -> AdminEndpoint:
        self._thread.start()
        return self

    def alive(self) -> bool:
        """False once the admin thread has ended (after close(), or by a failure)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop answering and close the socket. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if not self._sock.closed:
            self._sock.close(linger=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if len(frames) < 2:
                continue  # not a DEALER/REQ envelope: nothing to reply to
            if self._limiter.allow(frames[0]):
                reply = self.handle(frames[-1])
            else:
                self.swapper.metrics.rate_limited.labels(listener="admin").inc()
                reply = protocol.error_reply(protocol.OVERLOADED, "rate limited")
            try:
                self._sock.send_multipart([frames[0], b"", wire.packb(reply)], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the operator's socket went away
                log.warning("admin.reply_dropped", error=str(e))

    def handle(self, payload: bytes) -> dict[str, Any]:
        """One request's reply; never raises."""
        command = "invalid"
        try:
            msg = wire.unpackb(payload, max_bytes=MAX_REQUEST_BYTES)
            if not isinstance(msg, dict):
                raise protocol.ProtocolError(protocol.BAD_MESSAGE, "expected a map")
            token = msg.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
                command = "unauthorized"
                raise protocol.ProtocolError(protocol.UNAUTHORIZED, "missing or wrong token")
            command = msg.get("command")
            if command not in COMMANDS:
                command = "invalid"
                raise protocol.ProtocolError(
                    protocol.INVALID_FIELD,
                    f"'command': expected one of {list(COMMANDS)}, got {msg.get('command')!r}",
                )
            reply = {"ok": True, "status": self._run_command(command, msg)}
            outcome = "ok"
        except protocol.ProtocolError as e:
            reply, outcome = e.reply(), e.code
        except Exception as e:  # a SwapError or a bug: the operator sees why, the server serves on
            from openpi_rl.policy_server.swapper import SwapError

            if not isinstance(e, SwapError):
                log.exception("admin.failed", command=command)
            reply, outcome = protocol.error_reply(protocol.INTERNAL, str(e)), "failed"
        self.swapper.metrics.admin_requests.labels(command=command, outcome=outcome).inc()
        if command not in ("status", "invalid"):
            log.info("admin", command=command, version=msg.get("version"), outcome=outcome)
        return reply

    def _run_command(self, command: str, msg: dict) -> dict[str, Any]:
        s = self.swapper
        if command == "pin":
            version = msg.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise protocol.ProtocolError(
                    protocol.INVALID_FIELD, f"'version': expected an int >= 0, got {version!r}"
                )
            s.pin(version)
        elif command == "unpin":
            s.unpin()
        elif command == "rollback":
            s.rollback("admin")
        elif command in ("pause-learning", "resume-learning"):
            s.set_learning_paused(command == "pause-learning")
        return s.status()


def admin_main(argv: list[str] | None = None) -> int:
    """`openpi-rl admin COMMAND [VERSION]`: prints the reply as JSON; exit 0 ok, 1 error reply,
    2 usage or no reply."""
    parser = argparse.ArgumentParser(prog="openpi-rl admin", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command",
        choices=COMMANDS,
        help="status: the live version and health; pin VERSION: serve it, ignore newer ones; "
        "unpin: follow the learner again; rollback: pin the newest good version before the "
        "live one; pause-learning / resume-learning: the switch the learner reads",
    )
    parser.add_argument("version", nargs="?", type=int, help="for pin: the version to serve")
    parser.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"the server's admin endpoint (its swap.admin_endpoint; default: {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--token", default=None, help=f"the server's admin token (default: ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="give up (exit 2) when no reply comes within this long (default: 30; a pin loads "
        "the version first)",
    )
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        parser.error(f"no token: pass --token or set {TOKEN_ENV}")
    if args.command == "pin" and args.version is None:
        parser.error("pin needs a VERSION")
    try:
        reply = admin_request(args.endpoint, token, args.command, args.version, args.timeout_s)
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


__all__ = ["COMMANDS", "TOKEN_ENV", "AdminEndpoint", "admin_main", "admin_request"]
