"""Helper process for the kill tests (run as a script, not collected by pytest).

    python _kill_writer.py DIR RATE OBS_BYTES COMMIT_INTERVAL_S [N]

Appends transitions at RATE per second (forever, or N of them and then SIGKILLs itself) and
prints "<id> <monotonic time after append returned>" for each, flushed at once.
"""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import structlog

from openpi_rl.replay import ReplayConfig, ReplayWriter

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
root, rate, obs_size, ci = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
n = int(sys.argv[5]) if len(sys.argv) > 5 else None
writer = ReplayWriter(ReplayConfig(path=root, commit_interval_s=float(ci)))
obs = np.random.default_rng(0).bytes(obs_size)
actions = np.arange(8, dtype=np.float32).reshape(4, 2)
print("ready", flush=True)
t_next, i = time.monotonic(), 0
while n is None or i < n:
    tid = writer.append_transition("r0", "e0", i, 1, obs, actions, None, -0.5, 0.1, t_next)
    print(tid, time.monotonic(), flush=True)
    i += 1
    t_next += 1.0 / rate
    time.sleep(max(0.0, t_next - time.monotonic()))
os.kill(os.getpid(), signal.SIGKILL)
