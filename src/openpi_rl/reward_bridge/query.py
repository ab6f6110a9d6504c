"""Query mode: the seed's `HumanRewardWebSocket` / `HumanRewardHTTP` ask for one reward per
step (`{"observation", "actions"}` in, `{"reward"}` out, see `openpi_rl.rl.reward`); the bridge
shows the step on the pendants (a text summary, a thumbnail when the observation holds an
image) and answers with the first operator's choice, or with the configured default after a
timeout (counted)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from openpi_rl.reward_bridge.events import BadRequest, parse_number, show
from openpi_rl.reward_bridge.frames import as_image
from openpi_rl.reward_bridge.metrics import BridgeMetrics
from openpi_rl.rl.reward import summarize_step

log = structlog.get_logger("openpi_rl.reward_bridge.query")


class QueryBroker:
    """Pending reward queries; `broadcast(message)` tells every pendant about changes."""

    def __init__(
        self,
        broadcast: Callable[[dict[str, Any]], None],
        metrics: BridgeMetrics,
        timeout_s: float = 20.0,
        default_reward: float = 0.0,
        max_abs_reward: float = 10.0,
    ):
        self._broadcast = broadcast
        self.metrics = metrics
        self.timeout_s, self.default_reward = timeout_s, default_reward
        self.max_abs_reward = max_abs_reward
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[dict[str, Any], asyncio.Future]] = {}

    def pending(self) -> list[dict[str, Any]]:
        """The queries a newly connected pendant should show, oldest first."""
        return [info for info, _ in self._pending.values()]

    async def ask(self, request: dict[str, Any], robot_id: str) -> float:
        """The reward for one `{"observation", "actions"}` request (validated here)."""
        observation, actions = request.get("observation"), request.get("actions")
        if not isinstance(observation, dict) or actions is None:
            raise BadRequest(
                "bad_event", 'expected {"observation": {...}, "actions": [...]} (a reward query)'
            )
        qid = f"q{next(self._ids)}"
        info = {
            "type": "query",
            "query_id": qid,
            "robot_id": robot_id,
            "summary": _summary(observation, actions),
            "thumbnail": thumbnail(observation),
            "timeout_s": self.timeout_s,
            "t": time.time(),
        }
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[qid] = (info, fut)
        self._broadcast(info)
        try:
            reward, operator = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
            self.metrics.queries.labels("answered").inc()
            log.info("query.answered", query_id=qid, reward=reward, operator=operator)
            return reward
        except TimeoutError:
            self.metrics.queries.labels("timeout").inc()
            log.warning("query.timeout", query_id=qid, default_reward=self.default_reward)
            return self.default_reward
        finally:
            self._pending.pop(qid, None)
            self._broadcast({"type": "query_done", "query_id": qid})

    def answer(self, msg: dict[str, Any], operator: str) -> None:
        qid = msg.get("query_id")
        reward = parse_number(msg, "reward", self.max_abs_reward, required=True)
        if not isinstance(qid, str):  # also keeps an unhashable id away from the dict lookup
            raise BadRequest("bad_event", f"query_id: expected a string, got {show(qid)}")
        entry = self._pending.get(qid)
        if entry is None:
            raise BadRequest("bad_event", f"query_id: {show(qid)} is not pending (answered?)")
        if not entry[1].done():
            entry[1].set_result((float(reward), operator))


def _summary(observation: dict, actions: Any) -> str:
    try:
        return summarize_step(observation, np.asarray(actions, dtype=np.float64))
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        return summarize_step(observation, actions)
    except (TypeError, ValueError, RecursionError):  # ragged lists, nesting (found by fuzzing)
        return f"Observation keys: {', '.join(map(str, list(observation)[:20]))}"


def thumbnail(observation: dict[str, Any], max_side: int = 128) -> str | None:
    """A PNG data URL of the first image-like array in the observation ([H, W, 1|3|4],
    [1|3, H, W] or [H, W]; uint8 values, or floats in [0, 1] or [-1, 1]), or None."""
    try:
        leaves = list(_leaves(observation))
    except RecursionError:  # nesting as deep as JSON allows: no image to show
        return None
    for value in leaves:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        img = as_image(arr)
        if img is not None:
            step = max(1, math.ceil(max(img.shape[:2]) / max_side))
            return png_data_url(np.ascontiguousarray(img[::step, ::step]))
    return None


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list) and tree and isinstance(tree[0], list):
        yield tree


def png_data_url(img: np.ndarray) -> str:
    """Encode uint8 [H, W, 1|3|4] as a PNG data URL (zlib + struct; no imaging library)."""
    h, w, c = img.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter 0 per scanline
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
