"""One process of a 2-process `openpi-rl learn`: 2 CPU devices each, joined on 127.0.0.1:PORT.

    python _distributed_learner.py PROCESS_ID PORT DIR UPDATES [TIMEOUT_S]

Trains on DIR/replay (written beforehand), saves versions into DIR/ckpt (both processes their
shards, process 0 the manifests) and stops after UPDATES published updates (0: runs until
stopped or killed); exits with `learn`'s status. TIMEOUT_S: the heartbeat timeout (a peer silent
this long stops the others) and half the join timeout; 30 s unless given.
"""

import dataclasses
import sys
from pathlib import Path

from learner_helpers import learner_config

from openpi_rl.daemon.distributed import DistributedConfig
from openpi_rl.daemon.learner import learn

pid, port, root, updates = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
timeout_s = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
distributed = DistributedConfig(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
    local_device_count=2, initialization_timeout_s=2 * timeout_s, heartbeat_timeout_s=timeout_s,
    fsdp_min_size=0,
)  # fmt: skip
config = dataclasses.replace(
    learner_config(root), distributed=distributed, max_updates=updates or None
)
sys.exit(learn(config))
