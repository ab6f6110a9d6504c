"""`RewardBridge`: pendants and scripts send feedback, the bridge assigns credit and commits it
to the replay, and acknowledges only after the commit (DESIGN guarantee 2).

Ports (all bind `host`, loopback by default):
- `ws_port`: the pendant page (`GET /`), `GET /healthz`, WebSocket `/pendant` (operators) and
  WebSocket `/query` (the seed's `HumanRewardWebSocket`).
- `http_port`: `POST /feedback` (one event, `Authorization: Bearer TOKEN`), `POST /query`
  (`HumanRewardHTTP`), `GET /healthz`, and the page again.

The pendant protocol is in `ws_port.py`.

Limits (guarantee 6): `max_connections` per port, of which one peer address holds at most 3/4;
past it a newcomer sheds the oldest connection that has made no progress (an HTTP request not
fully arrived, a pendant without its hello), and only when none can be shed gets 503 (see
`httpd.ConnectionSlots`); `handshake_timeout_s` for a
WebSocket handshake or a whole HTTP request, websockets' `max_size` / `max_queue` and pings for
frames and dead peers, and a token bucket of `rate_limit_per_s` frames per WebSocket
connection (a frame over it gets a `rate_limited` error reply). Before a token is checked,
frames and bodies are capped at `max_message_bytes`. Behind `trusted_proxies` the per-address
share is the forwarded client's.

Stages: the event loop (both ports), the status poller and the replay writer's commit thread.
If one dies, `/healthz` answers 503 naming it, and `run()` returns 1 a moment later (the
service exits non-zero and its supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection, serve

from openpi_rl.guards import ConnectionSlots, parse_networks
from openpi_rl.replay import ReplayClosed, ReplayEventsConfig, ReplayFull
from openpi_rl.reward_bridge.config import BridgeConfig
from openpi_rl.reward_bridge.credit import (
    ATTACHED,
    VERDICTS,
    CreditRule,
    Feedback,
    default_rules,
    resolver,
)
from openpi_rl.reward_bridge.events import BadRequest, parse_feedback
from openpi_rl.reward_bridge.http_port import HttpPort
from openpi_rl.reward_bridge.httpd import mask_url
from openpi_rl.reward_bridge.httpd import start_http_server as start_http
from openpi_rl.reward_bridge.metrics import BridgeMetrics
from openpi_rl.reward_bridge.query import QueryBroker
from openpi_rl.reward_bridge.status import LiveStatus
from openpi_rl.reward_bridge.ws_port import WebSocketPort

log = structlog.get_logger("openpi_rl.reward_bridge")
FAILED_EXIT_DELAY_S = 2.0  # after a stage dies: /healthz says so this long, then run() ends


class RewardBridge(WebSocketPort, HttpPort, LiveStatus):
    """One bridge process: `start()` (background thread) or `run()` (blocking); `close()`
    stops accepting, lets commits finish and closes the replay writer. Idempotent.

    The ports' handlers and the status poller are mixed in (`ws_port.py`, `http_port.py`,
    `status.py`); the state they share lives here."""

    def __init__(
        self,
        config: BridgeConfig,
        rules: Mapping[str, CreditRule] | None = None,
        metrics: BridgeMetrics | None = None,
    ):
        self.config = config
        self.rules = dict(rules or default_rules(config.press_latency_s))
        self.metrics = metrics or BridgeMetrics()
        self._proxies = parse_networks(config.trusted_proxies)
        self.writer = ReplayEventsConfig(
            path=config.replay_dir, fsync_interval_s=config.fsync_interval_s
        ).create()
        self._tokens = [(tok.encode(), name) for name, tok in config.operators.items()]
        if not self._tokens:
            log.warning("bridge.no_operators", hint="no token will be accepted; set [operators]")
        self._query_open = config.query_token is None and is_loopback(config.host)
        if config.query_token is None and not self._query_open:
            log.warning(
                "bridge.query_refused",
                host=config.host,
                hint="/query needs a token beyond loopback; set query_token",
            )
        self.ws_port, self.http_port = config.ws_port, config.http_port
        self.queries = QueryBroker(
            self._broadcast,
            self.metrics,
            config.query_timeout_s,
            config.query_default_reward,
            config.max_abs_value,
        )
        self._pendants: dict[ServerConnection, str | None] = {}  # connection -> robot shown
        self._outbox: dict[ServerConnection, int] = {}  # connection -> sends waiting
        self._failed: dict[str, str] = {}  # dead stage -> why
        self._status: dict[str, dict[str, Any]] = {}
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bridge-status")
        self._reader = None
        self._replay = None  # a ReplayReader for frames' observations (the reader's thread)
        self._frames: dict[str, dict[str, Any]] = {}  # robot -> its newest frame (status.py)
        self._frame_made: dict[str, float] = {}
        self._returns: list[dict[str, Any]] = []  # the chart: mean return per version
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_asked = False  # close() before the loop existed: it stops once it does
        self._run_thread: int | None = None  # run's thread while it runs: it releases on exit
        self._run_ended = threading.Event()
        self._closed = False
        self._released = False
        self._tasks: set[asyncio.Task] = set()
        self._ws_slots = ConnectionSlots(config.max_connections)  # past the handshake
        self._http_slots = ConnectionSlots(config.max_connections)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> RewardBridge:
        """`run()` on a thread; returns once both ports listen (TimeoutError past `timeout_s`)."""
        self._thread = threading.Thread(target=self.run, name="reward-bridge", daemon=True)
        self._thread.start()
        if not self.wait_ready(timeout_s):
            raise TimeoutError(f"reward bridge not listening after {timeout_s} s")
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the WebSocket (and HTTP) port listens; False past `timeout`."""
        return self._ready.wait(timeout)

    def run(self) -> int:
        """Serve until `close()` (0) or until a stage has died (1); closes the replay writer on
        its way out."""
        if self._released:
            return 0
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        try:
            asyncio.run(self._main())
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()
        return 1 if self._failed else 0

    @property
    def ws_slots(self) -> ConnectionSlots:
        """Who holds the WebSocket port's connections past the handshake (count, shed_count)."""
        return self._ws_slots

    @property
    def http_slots(self) -> ConnectionSlots:
        """Who holds the HTTP port's connections (count, shed_count)."""
        return self._http_slots

    @property
    def failed(self) -> dict[str, str]:
        """Stages that died (stage -> why); empty while healthy."""
        return dict(self._failed)

    def _stage_failed(self, stage: str, why: str) -> None:
        """A stage died: /healthz says so at once, and the bridge stops a moment later."""
        if self._closed or stage in self._failed:
            return
        self._failed[stage] = why
        log.error("bridge.stage_failed", stage=stage, error=why, exit_in_s=FAILED_EXIT_DELAY_S)
        if self._loop is not None and self._stop is not None:
            self._loop.call_later(FAILED_EXIT_DELAY_S, self._stop.set)

    def close(self) -> None:
        """Stop accepting, let commits finish (their acks go out), close the replay writer.
        Idempotent, from any thread: while `run` runs on another thread, it returns once `run`
        has returned (at most 30 s). On `run`'s own thread (a signal handler) it only asks the
        loop to stop, and `run` releases on its way out."""
        self._stop_asked = True
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        running = self._run_thread
        if running == threading.get_ident():
            return
        self._closed = True
        if running is not None:
            self._run_ended.wait(30)
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._closed = self._released = True
        self.writer.close()
        for reader in (self._reader, self._replay):
            if reader is not None:
                self._db.submit(reader.close)  # the connection belongs to that thread
        self._db.shutdown(wait=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self._stop_asked:  # closed before the loop existed
            self._stop.set()
        c = self.config
        quiet = logging.getLogger("openpi_rl.reward_bridge.websockets")
        quiet.setLevel(logging.WARNING)  # websockets would log request lines (query tokens)
        if not any(isinstance(f, MaskUrls) for f in quiet.filters):
            quiet.addFilter(MaskUrls())  # and what it logs at WARNING and above, masked
        async with serve(
            self._on_ws,
            c.host,
            c.ws_port,
            process_request=self._on_ws_http,
            max_size=c.max_message_bytes,  # until the token: raised per connection after it
            max_queue=4,
            open_timeout=c.handshake_timeout_s,
            compression=None,
            logger=quiet,
        ) as ws_server:
            self.ws_port = ws_server.sockets[0].getsockname()[1]
            http_server = None
            if c.http_port is not None:
                http_server = await start_http(
                    self._on_http,
                    c.host,
                    c.http_port,
                    c.max_query_bytes,
                    header_timeout_s=c.handshake_timeout_s,
                    slots=self._http_slots,
                    on_refused=self.metrics.refused_connections.labels("http").inc,
                    on_shed=self.metrics.refused_connections.labels("http").inc,
                    check_head=self._check_http_head,
                    trusted_proxies=self._proxies,
                )
                self.http_port = http_server.sockets[0].getsockname()[1]
            poller = asyncio.create_task(self._poll_status())
            poller.add_done_callback(self._on_poller_done)
            log.info(
                "bridge.listening", host=c.host, ws_port=self.ws_port, http_port=self.http_port
            )
            self._ready.set()
            await self._stop.wait()
            poller.cancel()
            if http_server is not None:
                http_server.close()
            if self._tasks:  # events being committed still get their ack
                await asyncio.wait(self._tasks, timeout=c.ack_timeout_s)

    # ---- auth --------------------------------------------------------------------------------

    def operator_for(self, token: Any) -> str | None:
        """The operator a token names. Compares against every token, in constant time each."""
        given = token.encode() if isinstance(token, str) else b""
        found = None
        for tok, name in self._tokens:
            if hmac.compare_digest(given, tok):
                found = name
        return found

    def _query_token_needed(self) -> bool:
        return self.config.query_token is not None

    def _query_allowed(self, token: str | None) -> bool:
        """Whether /query may be served: the token matches, or none is configured and the
        bridge binds loopback only."""
        want = self.config.query_token
        if want is None:
            return self._query_open
        return hmac.compare_digest((token or "").encode(), want.encode())

    # ---- feedback (shared by WebSocket and HTTP) -----------------------------------------------

    async def feedback(self, msg: dict[str, Any], operator: str) -> dict[str, Any]:
        """Validate, assign credit, commit, and return the acknowledgement."""
        t0 = time.monotonic()
        c = self.config
        ev = parse_feedback(
            msg, operator, time.time(), c.max_abs_value, c.success_value, c.failure_value
        )
        if ev.kind in VERDICTS and c.verdict_settle_s > 0:
            # Let the server's last commit interval reach the database, so "the episode's
            # last transition" includes the chunk that was playing at the press.
            await asyncio.sleep(c.verdict_settle_s)
        try:
            fut = self.writer.submit_reward_event(
                ev.robot_id,
                ev.kind,
                ev.value,
                operator,
                ev.t,
                ev.idempotency_key,
                episode_id=ev.episode_id,
                client_time=ev.client_time,
                resolve=resolver(self.rules, ev),
            )
            self.metrics.replay_queue_depth.set(self.writer.queue_depth())
            result = await asyncio.wait_for(asyncio.wrap_future(fut), c.ack_timeout_s)
        except (ReplayFull, ReplayClosed, TimeoutError) as e:
            if isinstance(e, ReplayClosed):  # the writer's commit stage died (we are not closing)
                self._stage_failed("replay-writer", repr(e))
            log.error("bridge.not_stored", robot_id=ev.robot_id, kind=ev.kind, error=repr(e))
            raise BadRequest(
                "not_stored", f"not committed ({type(e).__name__}); resend with the same key"
            ) from e
        if result.duplicate:
            self.metrics.duplicates.inc()
        else:
            status = result.status or ATTACHED
            self.metrics.events.labels(ev.kind, status).inc()
            if result.transition_id is None:
                self.metrics.unattached.labels(status).inc()
                log.warning("bridge.event_unattached", robot_id=ev.robot_id, status=status)
        self.metrics.ack_seconds.observe(time.monotonic() - t0)
        return _ack(ev, result)

    # ---- plumbing ------------------------------------------------------------------------------

    def _on_poller_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._stage_failed("status-poller", repr(task.exception()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def is_loopback(host: str) -> bool:
    """Whether `host` (the bind address) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", 0.0.0.0, a host name: beyond loopback


class MaskUrls(logging.Filter):
    """Masks secret query parameters (`mask_url`) in a log record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(TypeError, ValueError):  # a message that does not format
            record.msg, record.args = _mask_text(record.getMessage()), None
        return True


def _mask_text(text: str) -> str:
    return " ".join(mask_url(word) if "?" in word else word for word in text.split(" "))


def _ack(ev: Feedback, result: Any) -> dict[str, Any]:
    return {
        "type": "ack",
        "idempotency_key": ev.idempotency_key,
        "robot_id": ev.robot_id,
        "kind": ev.kind,
        "value": ev.value,
        "event_id": result.id,
        "transition_id": result.transition_id,
        "episode_id": result.episode_id,
        "status": result.status,
        "duplicate": result.duplicate,
    }
