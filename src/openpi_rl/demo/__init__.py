"""`openpi-rl demo`: the whole service on one machine — `openpi-rl daemon` (policy server,
reward bridge, learner) with simulated MuJoCo robots on `PolicyClient`s and a simulated
operator at the pendant's WebSocket, and a live table of what it learns. Talks to: the daemon
(as a child process), the server (ZMQ), the bridge (WebSocket), the replay (read-only)."""

from openpi_rl.demo.config import DemoService, write_demo_config
from openpi_rl.demo.operator import OperatorPolicy, SimOperator
from openpi_rl.demo.robots import Episode, Fleet, SimRobot, start_robots
from openpi_rl.demo.run import DemoConfig, DemoResult, demo_main, run_demo, summary
from openpi_rl.demo.service import DaemonProcess

__all__ = [
    "DaemonProcess",
    "DemoConfig",
    "DemoResult",
    "DemoService",
    "Episode",
    "Fleet",
    "OperatorPolicy",
    "SimOperator",
    "SimRobot",
    "demo_main",
    "run_demo",
    "start_robots",
    "summary",
    "write_demo_config",
]
