"""`BridgeConfig`: what `openpi-rl bridge --config FILE` reads (TOML, same names as flags)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from openpi_rl.secret import SECRET


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    replay_dir: str = "replay"
    """The policy server's replay directory; the bridge writes reward events only."""
    fsync_interval_s: float | None = None
    """None: events are committed, not fsynced (a `kill -9` loses nothing acknowledged; power
    loss may). A number: a commit also fsyncs the WAL once the last fsync is this old (0: every
    commit, before its ack); the replay writer's `fsync_interval_s`."""
    host: str = "127.0.0.1"
    """Every listener binds here; set 0.0.0.0 (or the pendant network's address) to expose."""
    ws_port: int = 8765
    """Pendant page (GET /), WebSocket /pendant and /query, GET /healthz."""
    http_port: int | None = 8766
    """POST /feedback, POST /query, GET /healthz; None: off."""
    metrics_host: str = "127.0.0.1"
    """Where Prometheus /metrics listens."""
    metrics_port: int | None = 9102
    """Prometheus /metrics; None: off."""
    operators: Annotated[dict[str, str], SECRET] = dataclasses.field(default_factory=dict)
    """Operator name -> token. Put tokens in the TOML file (`[operators]`), not on the command
    line; they are compared in constant time and never logged. Empty: nobody gets in."""
    query_token: Annotated[str | None, SECRET] = None
    """/query's token, sent as `Authorization: Bearer TOKEN` (HTTP and the WebSocket
    handshake) or in a first `{"type": "hello", "token"}` frame (WebSocket), never in the URL
    (a `?token=` is ignored, and masked in the log). Unset: /query is open while `host` is
    loopback, and refused when the bridge binds beyond it."""
    robots: tuple[str, ...] = ()
    """Robots listed on the page before they have served anything."""
    press_latency_s: float = 0.3
    """A step reward lands on the transition live this long before the press."""
    verdict_settle_s: float = 0.1
    """Success/failure/end wait this long before credit, so the server's last commit interval
    (default 50 ms) has reached the database."""
    success_value: float = 1.0
    """The terminal reward of a success press that carries no value."""
    failure_value: float = 1.0
    """A failure press that carries no value gives minus this."""
    max_abs_value: float = 10.0
    """A press's or a query answer's value past ±this is refused (`bad_event`)."""
    status_interval_s: float = 0.5
    """How often the bridge reads the replay for the pendants' live status (pushed when it
    changed, and at least every 5 s)."""
    frame_interval_s: float | None = 0.5
    """A robot's newest camera frame (each image of its latest stored observation, as a JPEG
    thumbnail) goes to the pendants showing that robot at most once per this many seconds, and
    only when it has a newer transition; None: no frames."""
    frame_max_side: int = 224
    """The thumbnails' longer side, in pixels (never enlarged; openpi's 224 x 224 cameras go
    as they are, 3-12 KB each as JPEG)."""
    returns_interval_s: float = 2.0
    """How often the bridge re-reads the mean return per policy version for the pendants'
    chart (pushed when it changed)."""
    returns_episodes: int = 10_000
    """The chart covers this many most recently ended episodes."""
    ack_timeout_s: float = 10.0
    """An event not committed by then gets a `not_stored` error (resend with the same key)."""
    auth_timeout_s: float = 10.0
    """A WebSocket that sends no hello with its token within this long is closed (4401)."""
    max_message_bytes: int = 64 * 1024
    """Pendant frames and /feedback bodies; a larger one gets `too_large`, the connection stays
    (a pendant frame past 4x this closes it: 1009). Before the token is checked (a hello, a
    /query without its token, an HTTP body of any endpoint but an authorized /query) this is
    the cap, and past it the connection is closed (1009) or answered 413 unread."""
    max_query_bytes: int = 16 * 2**20
    """Reward queries carry observations (images); frames past this close the connection."""
    max_pending_acks: int = 256
    """Events a pendant may have waiting for their commit; past it: `rate_limited`."""
    query_timeout_s: float = 20.0
    """A reward query nobody answers within this long gets `query_default_reward`. Keep it below
    the provider's own `timeout_s` so the default, not an error, comes back."""
    query_default_reward: float = 0.0
    """The reward of a query that timed out."""

    # Hostile clients (guarantee 6): each listener keeps serving good clients.

    max_connections: int = 256
    """Connections per port (WebSocket, HTTP); one client address holds at most 3/4 of it. Past it, the
    oldest connection that has not sent its request (HTTP) or its hello (pendant) makes way for
    the newcomer; 503 only when none can. A site of 200 pendants fits the default."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (`"127.0.0.1"`, `"10.0.0.0/8"`) of reverse proxies in front of
    the bridge (the TLS proxy of deploy/nginx-openpi-rl-bridge.conf). A connection from one
    counts against the client it names in `X-Forwarded-For` / `X-Real-IP`; from anyone else
    those headers are ignored."""
    rate_limit_per_s: float = 100.0
    """Frames per second per WebSocket connection; one over gets a `rate_limited` error reply."""
    rate_limit_burst: int = 200
    """Frames a WebSocket connection may send back to back before `rate_limit_per_s` applies
    (the token bucket's size)."""
    handshake_timeout_s: float = 5.0
    """A WebSocket handshake or an HTTP request (headers and body) not done by then is dropped
    (slow-loris)."""

    def __post_init__(self) -> None:
        checks = (
            ("frame_interval_s", self.frame_interval_s is None or self.frame_interval_s > 0),
            ("frame_max_side", self.frame_max_side >= 8),
            ("returns_interval_s", self.returns_interval_s > 0),
            ("returns_episodes", self.returns_episodes >= 1),
        )
        for name, ok in checks:
            if not ok:
                want = {"frame_max_side": "at least 8", "returns_episodes": "at least 1"}
                raise ValueError(
                    f"{name}: expected {want.get(name, 'a positive number')},"
                    f" got {getattr(self, name)!r}"
                )
