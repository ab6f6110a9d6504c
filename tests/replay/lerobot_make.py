"""Run in the LeRobot venv (tests/conftest.py's `lerobot_python`), not by pytest: write a small
dataset with the registry's own `LeRobotDataset.create` / `add_frame` / `save_episode` (its
parquet, its SVT-AV1 videos, its meta), single-step actions [D] as most LeRobot datasets have,
and save what went in to OUT.npz for the test to compare an import against.

usage: python lerobot_make.py DATASET_DIR OUT.npz
"""

import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out = Path(sys.argv[1]), sys.argv[2]
H, W = 32, 48
features = {
    "observation.state": {"dtype": "float32", "shape": (3,), "names": None},
    "observation.images.cam": {"dtype": "video", "shape": (H, W, 3), "names": ["h", "w", "c"]},
    "action": {"dtype": "float32", "shape": (2,), "names": None},
    "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    "next.done": {"dtype": "bool", "shape": (1,), "names": None},
}
ds = LeRobotDataset.create("local/teleop", fps=15, features=features, root=root, use_videos=True)
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
saved: dict[str, list] = {"state": [], "cam": [], "action": [], "reward": [], "done": []}
for episode, (n, task) in enumerate([(5, "pick the cube"), (4, "place the cube")]):
    for t in range(n):
        disc = 120 * np.exp(-((xx - 8 - 3 * t - episode) ** 2 + (yy - 10 - 2 * t) ** 2) / 30.0)
        cam = np.stack([xx * 3 + disc, yy * 4 + 40, 200 - xx * 2 + disc / 2], -1)
        frame = {
            "observation.state": rng.standard_normal(3).astype(np.float32),
            "observation.images.cam": np.clip(cam, 0, 255).astype(np.uint8),
            "action": rng.standard_normal(2).astype(np.float32),
            "next.reward": np.array([rng.uniform()], np.float32),
            "next.done": np.array([t == n - 1]),
            "task": task,
        }
        ds.add_frame(dict(frame))
        for key, name in (
            ("state", "observation.state"),
            ("cam", "observation.images.cam"),
            ("action", "action"),
            ("reward", "next.reward"),
            ("done", "next.done"),
        ):
            saved[key].append(frame[name])
    ds.save_episode()
ds.finalize()
np.savez(out, **{k: np.stack(v) for k, v in saved.items()})
print("ok")
