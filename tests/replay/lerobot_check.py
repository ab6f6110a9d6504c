"""Run in the LeRobot venv (tests/conftest.py's `lerobot_python`), not by pytest: open a dataset
directory with the registry's `LeRobotDataset`, read every frame, check each feature's shape
against `meta/info.json`, save the camera frames as LeRobot decoded them (uint8 HWC) to OUT.npz,
and print, as the last line, one JSON object with what it read.

usage: python lerobot_check.py DATASET_DIR OUT.npz [MAX_FRAMES]
(MAX_FRAMES: read that many frames, evenly spaced from the first to the last, instead of all)
"""

import json
import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out = Path(sys.argv[1]), sys.argv[2]
ds = LeRobotDataset("local/openpi-rl-export", root=root)
picked = range(len(ds))
if len(sys.argv) > 3 and int(sys.argv[3]) < len(ds):
    picked = sorted({round(i) for i in np.linspace(0, len(ds) - 1, int(sys.argv[3]))})
shapes: dict[str, list[int]] = {}
numbers: dict[str, list] = {"observation.state": [], "action": [], "next.reward": []}
cameras: dict[str, list[np.ndarray]] = {k: [] for k in ds.meta.video_keys}
tasks = []
for idx in picked:
    item = ds[idx]
    assert int(item["index"]) == idx, (int(item["index"]), idx)
    for key, spec in ds.meta.features.items():
        shape = list(item[key].shape)
        shapes.setdefault(key, shape)
        declared = list(spec["shape"])  # LeRobot reads shapes as tuples
        want = [declared[2], *declared[:2]] if spec["dtype"] == "video" else declared
        assert shape == want or (declared == [1] and shape == []), (key, shape, spec)
    for key in numbers:
        numbers[key].append(item[key].numpy().tolist())
    for key in cameras:  # LeRobot gives float CHW in [0, 1]
        cameras[key].append((item[key].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
    tasks.append(item["task"])
np.savez(out, **{k: np.stack(v) for k, v in cameras.items()})
print(
    json.dumps(
        {
            "frames": len(ds),
            "read": len(picked),
            "episodes": ds.meta.total_episodes,
            "fps": ds.fps,
            "shapes": shapes,
            "numbers": numbers,
            "tasks": tasks,
            "video_backend": ds.video_backend,
        }
    )
)
