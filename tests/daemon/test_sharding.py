"""Data-parallel learn step: on 4 forced CPU devices (weights replicated or FSDP-sharded) it
equals the single-device step."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "_sharded_update.py"


def test_sharded_update_on_four_devices_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax imports
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["info"]["4"]["batch_devices"] == 4
    assert out["info"]["4"]["params_replicated"]
    fsdp = out["info"]["4fsdp"]  # every kernel has a dimension 4 divides (obs 3 -> 16 -> 16)
    assert fsdp["batch_devices"] == 4 and fsdp["sharded_leaves"] >= 4, fsdp
    assert fsdp["sharded_opt_leaves"] >= 2 * fsdp["sharded_leaves"], fsdp  # Adam's mu and nu
    assert out["param_max_update"] > 1e-3  # the update moved the weights ...
    assert out["param_max_abs_diff"] < 1e-5  # ... identically on 1 and 4 devices, both layouts
    assert out["metrics"]["finite"] == 1.0
    assert all(d < 1e-4 for d in out["metric_abs_diff"].values()), out["metric_abs_diff"]
