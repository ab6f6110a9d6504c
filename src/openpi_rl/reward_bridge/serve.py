"""`openpi-rl bridge --config FILE`: the reward bridge as a service (SIGTERM / Ctrl-C: stop
accepting, let commits finish, close the replay writer, exit 0; a stage that died: exit 1)."""

from __future__ import annotations

import signal
import threading

import structlog
from prometheus_client import start_http_server

from openpi_rl.reward_bridge.config import BridgeConfig
from openpi_rl.reward_bridge.server import RewardBridge
from openpi_rl.sdnotify import HealthWatchdog, http_health


def serve(config: BridgeConfig) -> int:
    bridge = RewardBridge(config)
    if config.metrics_port is not None:
        httpd, _ = start_http_server(
            config.metrics_port, config.metrics_host, registry=bridge.metrics.registry
        )
        structlog.get_logger("openpi_rl.reward_bridge").info(
            "bridge.metrics", host=config.metrics_host, port=httpd.server_address[1]
        )
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: bridge.close())
    # READY=1 once listening, WATCHDOG=1 only while the event loop answers GET /healthz.
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    watchdog = HealthWatchdog(http_health(lambda: f"http://{host}:{bridge.ws_port}/healthz"))
    watchdog.start()
    try:
        code = bridge.run()  # 1: a stage died (logged, and said by /healthz meanwhile)
    finally:
        watchdog.close()
        bridge.close()
    return code
