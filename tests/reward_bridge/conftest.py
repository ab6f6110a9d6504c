"""A real replay (normal writer in the test process, as the policy server would hold it) and a
real bridge on loopback ports (events-only writer on the same directory)."""

import json
import time

import numpy as np
import pytest
import websockets.sync.client

from openpi_rl.replay import ReplayConfig, ReplayWriter, records
from openpi_rl.reward_bridge import BridgeConfig, RewardBridge

OPERATORS = {"ana": "tok-ana-0123456789", "bob": "tok-bob-9876543210"}


def add_transitions(writer: ReplayWriter, robot: str, episode: str, n: int, gap_s: float = 0.0):
    """Append n transitions (policy version 3), committed on return; their ids in order."""
    ids = []
    for i in range(n):
        ids.append(
            writer.append_transition(
                robot, episode, i, 3, b"obs", np.zeros((2, 2), np.float32), None, -0.1, 0.0, 0.0
            )
        )
        if gap_s:
            time.sleep(gap_s)
    writer.flush()
    return ids


def scene(h: int, w: int, shift: int = 0) -> np.ndarray:
    """A camera picture, uint8 [h, w, 3]: colour gradients and a red block `shift` pixels
    along (so two frames of one robot differ where the block moved)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 96)], -1)
    img = img.astype(np.uint8)
    left = (w // 4 + shift) % w
    img[h // 4 : h // 2, left : left + w // 5] = (230, 40, 40)
    return img


def jpeg_close(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether `got` is `want` within JPEG loss: same shape, mean absolute difference <= 3 grey
    levels (of 255), 99th percentile <= 32 (4:2:0 chroma blurs the red block's edges). A
    `scene` whose block moved by 30 pixels is off by a mean of 7."""
    err = np.abs(got.astype(int) - want.astype(int))
    return got.shape == want.shape and err.mean() <= 3 and np.percentile(err, 99) <= 32


def add_observation(
    writer: ReplayWriter,
    robot: str,
    episode: str,
    step: int,
    observation: dict,
    version: int = 3,
    reward: float | None = None,
    done: bool = False,
) -> int:
    """Append one transition holding `observation` (a real observation record), optionally
    reported with `reward` (and `done`); committed on return. Its id."""
    tid = writer.append_transition(
        robot,
        episode,
        step,
        version,
        records.encode_observation(observation),
        np.zeros((2, 2), np.float32),
        None,
        -0.1,
        0.0,
        0.0,
    )
    if reward is not None:
        writer.report(tid, reward, done=done, truncated=False).result(10)
    writer.flush()
    return tid


def counted(bridge: RewardBridge, name: str, **labels: str) -> float:
    """A counter's value as /metrics would show it (`name` with its `_total`); 0 before its
    first count."""
    return bridge.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def replay(tmp_path):
    with ReplayWriter(ReplayConfig(path=tmp_path / "replay", commit_interval_s=0.01)) as w:
        yield w


@pytest.fixture
def make_bridge(tmp_path, replay):
    bridges = []

    def make(**overrides) -> RewardBridge:
        config = dict(
            replay_dir=str(tmp_path / "replay"),
            ws_port=0,
            http_port=0,
            metrics_port=None,
            operators=OPERATORS,
            status_interval_s=0.1,
            verdict_settle_s=0.02,
            press_latency_s=0.0,  # transitions here are written just before the press
        )
        config.update(overrides)
        bridge = RewardBridge(BridgeConfig(**config)).start()
        bridges.append(bridge)
        return bridge

    yield make
    for b in bridges:
        b.close()


def pendant(bridge: RewardBridge, token: str = OPERATORS["ana"]):
    """A logged-in pendant connection (the welcome message already read)."""
    ws = websockets.sync.client.connect(f"ws://127.0.0.1:{bridge.ws_port}/pendant").__enter__()
    ws.send(json.dumps({"type": "hello", "token": token}))
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome"
    return ws


def recv_type(ws, kind: str, timeout: float = 10.0) -> dict:
    """The next message of this type (status pushes may come in between)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if msg["type"] == kind:
            return msg
