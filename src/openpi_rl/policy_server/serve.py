"""`openpi-rl serve --config FILE`: build the model, the replay and the server from one config
and serve until SIGTERM / Ctrl-C (stop accepting, flush the replay, exit 0). Beside the serving
loop: the swapper (follows the learner's versions) and, with a token, the admin endpoint."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import threading
from typing import Annotated

import structlog
from prometheus_client import start_http_server

from openpi_rl.models.choice import ModelChoice, ModelConfigError
from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.policy_server.admin import TOKEN_ENV, AdminEndpoint
from openpi_rl.policy_server.inputs import InputMap, RobotInputs
from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.openpi_ws import OpenPIWebSocketEndpoint
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.policy_server.swapper import SwapOptions, Swapper
from openpi_rl.replay import ReplayConfig, ReplayFormatError, ReplayLocked
from openpi_rl.sdnotify import HealthWatchdog, config_error, zmq_health
from openpi_rl.secret import SECRET
from openpi_rl.weights.start import build_start

log = structlog.get_logger("openpi_rl.policy_server")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: ModelChoice = GaussianMLPConfig()
    serve: ServeOptions = ServeOptions()
    replay_dir: str | None = "replay"
    """Every served chunk is stored here: a directory (SQLite + segment files), or a
    postgresql:// URL many servers share; None: not stored."""
    commit_interval_s: float = 0.05
    """Replay rows are committed at most this long after they were served: a `kill -9` of the
    server loses at most this much."""
    fsync_interval_s: float | None = None
    """None: the replay is committed, never fsynced (a `kill -9` loses nothing committed). A
    number: segments and the WAL are fdatasync'ed that often, against power loss."""
    retention_max_rows: int | None = None
    """Keep at most this many transitions; the oldest (whole segments) go first. None: no cap."""
    retention_max_bytes: int | None = None
    """Keep the replay directory's bytes on disk at most this (several times
    `segment_max_bytes`); the oldest transitions go first. None: no cap."""
    segment_max_bytes: int = 256 * 2**20
    """Observation bytes per segment file; retention deletes whole segments."""
    observations_dir: str | None = None
    """With a postgresql:// replay_dir: observation records go to segment files under this
    directory (one subdirectory per server run) instead of the database, several times faster;
    every reader (learner, bridge) must see it at the same path (a shared filesystem)."""
    value_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the value head's MLP (the learner's must match)."""
    metrics_host: str = "127.0.0.1"  # where Prometheus /metrics listens
    metrics_port: int | None = 9101  # Prometheus /metrics; None: off
    openpi_ws_host: str = "127.0.0.1"  # where openpi-client's WebSocket listens
    openpi_ws_port: int | None = 8000  # openpi-client's WebSocket protocol; None: off
    openpi_api_key: Annotated[str | None, SECRET] = None  # `Authorization: Api-Key …` when set
    openpi_key_map: tuple[tuple[str, str], ...] = ()  # (robot's key, our key) pairs
    inputs: str = "model"
    """How robots' observations become the model's (policy_server/inputs.py): "model" (the
    model's own keys), "libero", "droid", "aloha" (the keys openpi's example clients send), or
    a name of `input_maps`. Images are resized to the model's, prompts tokenized."""
    robot_inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Robot id -> input map name, for robots that differ from `inputs`."""
    input_maps: dict[str, InputMap] = dataclasses.field(default_factory=dict)
    """Input maps of this site's robots, by name (config file only: `[serve.input_maps.arm]`
    with `images`, `blank_images`, `state`, `default_prompt`, `action_dims`)."""
    seed: int = 0
    """Seed of version 0's weights, served until a published version is loaded; the learner's
    must match."""
    swap: SwapOptions = SwapOptions()  # hot-swap from the learner, heartbeats, admin
    gil_switch_interval_s: float = 0.0005
    """How long another thread may hold the GIL before the serving thread gets it back
    (`sys.setswitchinterval`; Python's default is 5 ms)."""


def build_server(config: ServeConfig) -> PolicyServer:
    """The server of `config`; raises ModelConfigError when its model does not build."""
    ac = build_start(config.model, config.value_hidden, config.seed)  # the learner's v0
    replay = (
        ReplayConfig(
            path=config.replay_dir,
            commit_interval_s=config.commit_interval_s,
            fsync_interval_s=config.fsync_interval_s,
            retention_max_rows=config.retention_max_rows,
            retention_max_bytes=config.retention_max_bytes,
            segment_max_bytes=config.segment_max_bytes,
            observations_dir=config.observations_dir,
        )
        if config.replay_dir
        else None
    )
    return PolicyServer(
        ac, config.serve, replay, metrics=ServerMetrics(), inputs=robot_inputs(config)
    )


def robot_inputs(config: ServeConfig) -> RobotInputs:
    """The server's input pipeline: the config's input maps over the model's tokenizer (a
    model with a fixed prompt tokenizes its state itself)."""
    model = config.model
    tokenize = getattr(model, "tokenize", None) if getattr(model, "prompt", None) is None else None
    try:
        return RobotInputs(
            model.obs_spec, tokenize, config.input_maps, config.inputs, config.robot_inputs
        )
    except ValueError as e:
        raise ModelConfigError(str(e)) from e


def tune_serving_process(gil_switch_interval_s: float = 0.0005) -> None:
    """Process settings for a serving process, called once its model is built.

    The serving thread shares the GIL with the swapper, the replay writer and the metrics
    server; a thread busy in Python keeps it up to the switch interval (5 ms by default) before
    a woken serving thread runs: 0.5 ms keeps them off the tail latency. Startup's objects
    (JAX, the model, imports) never die: frozen out of the collector's sight, a full
    collection does not walk them with the GIL held."""
    sys.setswitchinterval(gil_switch_interval_s)
    gc.freeze()


def serve(config: ServeConfig) -> int:
    try:
        server = build_server(config)
    except ReplayLocked as e:  # a second server on one replay directory: say so, exit 2
        print(f"openpi-rl serve: {e}", file=sys.stderr)
        return 2
    except ModelConfigError as e:  # e.g. a tokenizer file missing: held down, not restarted
        return config_error("serve", str(e))
    except ReplayFormatError as e:  # a replay from a newer openpi-rl: a restart cannot help
        return config_error("serve", str(e))
    tune_serving_process(config.gil_switch_interval_s)
    if config.metrics_port is not None:
        start_http_server(
            config.metrics_port, config.metrics_host, registry=server.metrics.registry
        )
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.close())
    swapper = Swapper(server, config.swap).start()
    token = config.swap.admin_token or os.environ.get(TOKEN_ENV)
    admin = None
    if token:
        admin = AdminEndpoint(
            swapper,
            config.swap.admin_endpoint,
            token,
            handshake_timeout_s=config.serve.handshake_timeout_s,
        ).start()
    ws = None
    if config.openpi_ws_port is not None:
        ws = OpenPIWebSocketEndpoint(
            server.inproc_endpoint,
            server.metadata(),
            host=config.openpi_ws_host,
            port=config.openpi_ws_port,
            api_key=config.openpi_api_key,
            key_map=dict(config.openpi_key_map),
            max_message_bytes=config.serve.max_message_bytes,
            metrics=server.metrics,
        ).start()
    log.info(
        "serving",
        endpoint=server.endpoint,
        openpi_ws=None if ws is None else f"ws://{config.openpi_ws_host}:{ws.port}",
        learner=config.swap.learner_endpoint,
        admin=None if admin is None else admin.endpoint,
        model=type(config.model).__name__,
    )
    for name, front in (("admin", admin), ("openpi-ws", ws)):
        if front is not None:
            server.watch(name, front.alive)
    # READY=1 after warm-up, WATCHDOG=1 only while the ROUTER loop answers a health request.
    watchdog = HealthWatchdog(zmq_health(server.inproc_endpoint)).start()
    try:
        server.run()
    finally:
        watchdog.close()
        if ws is not None:
            ws.close()
        if admin is not None:
            admin.close()
        swapper.close()
    if server.failure is not None:  # a stage died: non-zero, so the supervisor restarts us
        log.error("exiting after a stage failed", reason=server.failure)
        return 1
    return 0
