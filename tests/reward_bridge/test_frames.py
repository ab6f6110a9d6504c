"""The pendant's camera frames and returns chart: the bridge reads the watched robot's newest
stored observation, sends each camera as a JPEG thumbnail (rate-limited, to the pendants
showing that robot only), and pushes the mean return per policy version. The JPEG loss
bound: `conftest.jpeg_close`."""

import base64
import io
import json
import time

import numpy as np
import pytest
import websockets.sync.client
from PIL import Image

from openpi_rl.reward_bridge import BridgeConfig
from openpi_rl.reward_bridge.frames import camera_images, frame_message, jpeg_thumbnail
from tests.reward_bridge.conftest import (
    OPERATORS,
    add_observation,
    jpeg_close,
    pendant,
    recv_type,
    scene,
)


def decode(data_url: str) -> np.ndarray:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/jpeg;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_cameras_of_every_stored_layout_and_nothing_else():
    img = scene(96, 128)
    arrays = {
        "hwc": img,
        "chw_float01": img.transpose(2, 0, 1).astype(np.float32) / 255,
        "hwc_float_pm1": img.astype(np.float32) / 127.5 - 1,
        "grey": img[..., 0],
        "state": np.zeros(32, np.float32),
        "history": np.linspace(0, 1, 64 * 8, dtype=np.float32).reshape(64, 8),
        "tokenized_prompt": np.zeros(48, np.int32),
        "nan_image": np.full((16, 16, 3), np.nan, np.float32),
    }
    got = camera_images(arrays)
    assert list(got) == ["chw_float01", "grey", "hwc", "hwc_float_pm1"]
    for key in ("chw_float01", "hwc", "hwc_float_pm1"):
        assert np.abs(got[key].astype(int) - img).max() <= 1, key
    assert got["grey"].shape == (96, 128, 1)


def test_a_thumbnail_keeps_the_aspect_and_is_never_enlarged():
    big = scene(224, 320)
    small = Image.open(io.BytesIO(jpeg_thumbnail(big, 160)))
    assert small.size == (160, 112) and small.format == "JPEG"
    want = np.asarray(Image.fromarray(big).resize((160, 112), Image.Resampling.BICUBIC))
    assert jpeg_close(np.asarray(small.convert("RGB")), want)
    assert Image.open(io.BytesIO(jpeg_thumbnail(scene(40, 60), 160))).size == (60, 40)
    with pytest.raises(ValueError, match="img: expected uint8"):
        jpeg_thumbnail(big.astype(np.float32), 160)


def test_no_image_says_so():
    msg = frame_message("arm", 7, {"state": np.zeros(4, np.float32)}, 160)
    assert msg["cameras"] == {} and "no camera image in transition 7" in msg["note"]


def test_a_bad_frame_config_is_refused():
    with pytest.raises(ValueError, match="frame_max_side"):
        BridgeConfig(frame_max_side=0)
    with pytest.raises(ValueError, match="frame_interval_s"):
        BridgeConfig(frame_interval_s=-1.0)


def test_the_watched_robot_s_newest_frame_reaches_its_pendants_only(make_bridge, replay):
    top, wrist = scene(96, 128), scene(64, 64, shift=20)
    tid = add_observation(
        replay, "arm-1", "ep-1", 0, {"top": top, "wrist": wrist, "state": np.ones(4, np.float32)}
    )
    add_observation(replay, "arm-2", "ep-1", 0, {"state": np.ones(4, np.float32)})
    bridge = make_bridge(frame_interval_s=0.2)
    with pendant(bridge) as watcher, pendant(bridge) as other:
        watcher.send(json.dumps({"type": "subscribe", "robot_id": "arm-1"}))
        frame = recv_type(watcher, "frame")
        assert frame["robot_id"] == "arm-1" and frame["transition_id"] == tid
        assert sorted(frame["cameras"]) == ["top", "wrist"] and frame["note"] is None
        assert jpeg_close(decode(frame["cameras"]["top"]), top)
        assert jpeg_close(decode(frame["cameras"]["wrist"]), wrist)
        assert not jpeg_close(decode(frame["cameras"]["top"]), scene(96, 128, shift=30))

        other.send(json.dumps({"type": "subscribe", "robot_id": "arm-2"}))
        blank = recv_type(other, "frame")
        assert blank["robot_id"] == "arm-2" and blank["cameras"] == {}
        assert "no camera image" in blank["note"]

        # arm-1 moves on at 50 Hz for 1.2 s: its watcher sees the newest frames, at most one per
        # frame_interval_s; the pendant showing arm-2 gets none of them.
        t0, step, frames = time.monotonic(), 1, []
        while time.monotonic() - t0 < 1.2:
            add_observation(replay, "arm-1", "ep-1", step, {"top": scene(96, 128, shift=step)})
            step += 1
            time.sleep(0.02)
            while True:
                try:
                    msg = json.loads(watcher.recv(timeout=0))
                except TimeoutError:
                    break
                if msg["type"] == "frame":
                    frames.append(msg)
        assert 2 <= len(frames) <= 1.2 / 0.2 + 1, len(frames)
        ids = [f["transition_id"] for f in frames]
        assert ids == sorted(ids) and ids[0] > tid
        with pytest.raises(TimeoutError):
            while True:
                assert json.loads(other.recv(timeout=0.3))["type"] != "frame"


def test_the_chart_gets_one_point_per_version_live(make_bridge, replay):
    obs = {"state": np.ones(4, np.float32)}
    add_observation(replay, "arm-1", "ep-1", 0, obs, version=1, reward=2.0, done=True)
    bridge = make_bridge(returns_interval_s=0.1)
    url = f"ws://127.0.0.1:{bridge.ws_port}/pendant"
    with websockets.sync.client.connect(url) as ws:
        ws.send(json.dumps({"type": "hello", "token": OPERATORS["ana"]}))
        welcome = recv_type(ws, "welcome")
        versions = welcome["returns"] or recv_type(ws, "returns")["versions"]  # first read
        assert versions == [{"version": 1, "episodes": 1, "mean_return": 2.0}]
        add_observation(replay, "arm-1", "ep-2", 0, obs, version=2, reward=4.0, done=True)
        add_observation(replay, "arm-2", "ep-3", 0, obs, version=2, reward=6.0, done=True)
        while len(versions) < 2 or versions[1]["episodes"] < 2:
            versions = recv_type(ws, "returns")["versions"]
        assert versions[1] == {"version": 2, "episodes": 2, "mean_return": 5.0}
