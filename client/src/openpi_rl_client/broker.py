"""``ActionChunkBroker``: plays action chunks one control tick at a time, fetching the next
chunk in the background so the robot never waits at a chunk boundary.

Timeline (H = chunk length, d = ``inference_delay``): a chunk requested at tick ``s`` with
observation ``o_s`` holds the actions for ticks ``s, s+1, ..., s+H-1``. The broker sends that
request when ``d`` actions of the current chunk remain (the action for tick ``s`` included).
When the reply is adopted at tick ``t`` the first ``k = t - s`` actions are dropped (ticks
``s..t-1`` were already played from the old chunk) and play continues at ``chunk[k]``: no
repeated or skipped tick, hence no jerk at the boundary. If the old chunk runs out first,
``step`` blocks and ``stalls`` counts it; choose ``d`` above the inference latency in ticks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class ActionChunkBroker:
    """Turns a chunked policy into one action per ``step(observation)``.

    ``infer_fn(observation)`` returns an [H, D] array, or an object with an ``.actions``
    [H, D] array (e.g. :class:`~openpi_rl_client.client.InferResult`); that object is kept as
    ``current`` so the robot can report rewards against ``current.transition_id``. It runs on
    one background thread, one request at a time; its exceptions are re-raised by the next
    ``step``. The broker does not copy observations: do not mutate one after passing it.
    """

    def __init__(self, infer_fn: Callable[[Any], Any], inference_delay: int):
        if inference_delay < 1:
            raise ValueError(f"inference_delay: expected >= 1, got {inference_delay}")
        self._infer_fn = infer_fn
        self.inference_delay = int(inference_delay)
        self._cond = threading.Condition()
        self._chunk: np.ndarray | None = None
        self._index = 0  # next row of _chunk to play
        self._tick = 0  # steps played since the broker started (or reset)
        self._request: tuple[Any, int, int] | None = None  # (obs, tick, generation) to send
        self._in_flight = False
        self._result: tuple[Any, int, int] | None = None  # (reply, tick, generation)
        self._error: BaseException | None = None
        self._generation = 0
        self._closed = False
        self.current: Any = None  # what infer_fn returned for the chunk now playing
        self.stalls = 0  # steps that had to wait for a chunk (after the first)
        self.dropped_chunks = 0  # chunks that arrived entirely stale
        self._worker = threading.Thread(target=self._work, name="openpi-rl-broker", daemon=True)
        self._worker.start()

    @classmethod
    def from_client(cls, client: Any, inference_delay: int, prompt: str | None = None):
        """A broker fed by ``client.infer(observation, prompt=prompt)`` (a PolicyClient)."""
        return cls(lambda obs: client.infer(obs, prompt=prompt), inference_delay)

    def step(self, observation: Any) -> np.ndarray:
        """The action [D] for this tick. Blocks only for the first chunk or on a stall."""
        with self._cond:
            if self._closed:
                raise RuntimeError("ActionChunkBroker is closed")
            self._raise_error()
            self._adopt()
            if not self._playable() and self._chunk is not None:
                self.stalls += 1
            while not self._playable():
                if not self._in_flight:
                    self._send(observation)
                self._cond.wait_for(
                    lambda: (
                        self._result is not None
                        or self._error is not None
                        or self._closed
                        or self._playable()
                    )
                )
                if self._closed:
                    raise RuntimeError("ActionChunkBroker closed while waiting for a chunk")
                self._raise_error()
                self._adopt()
            if not self._in_flight and len(self._chunk) - self._index <= self.inference_delay:
                self._send(observation)
            action = self._chunk[self._index]
            self._index += 1
            self._tick += 1
            return action

    def reset(self) -> None:
        """Forget the current chunk (new episode); a reply still in flight is discarded."""
        with self._cond:
            self._generation += 1
            self._chunk, self._index, self._tick = None, 0, 0
            self._result, self._error, self.current = None, None, None

    def close(self) -> None:
        """Stop the background thread (after any request in flight returns). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5.0)

    def __enter__(self) -> ActionChunkBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- under self._cond -----------------------------------------------------------------

    def _playable(self) -> bool:
        return self._chunk is not None and self._index < len(self._chunk)

    def _send(self, observation: Any) -> None:
        self._request = (observation, self._tick, self._generation)
        self._in_flight = True
        self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _adopt(self) -> None:
        if self._result is None:
            return
        reply, tick, generation = self._result
        self._result = None
        if generation != self._generation:
            return
        chunk = reply.actions if hasattr(reply, "actions") else reply
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"infer_fn: expected an [H, D] chunk, got shape {chunk.shape}")
        k = self._tick - tick  # steps played from the old chunk since the request
        if k >= len(chunk):
            self.dropped_chunks += 1
            return
        self._chunk, self._index, self.current = chunk, k, reply
        self._cond.notify_all()  # other threads blocked in step() can play it

    # -- background thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._request is not None or self._closed)
                if self._closed:
                    return
                observation, tick, generation = self._request
                self._request = None
            try:
                reply = self._infer_fn(observation)
            except BaseException as e:  # handed to the control loop, which decides
                with self._cond:
                    self._in_flight = False
                    if generation == self._generation:
                        self._error = e
                    self._cond.notify_all()
                continue
            with self._cond:
                self._in_flight = False
                self._result = (reply, tick, generation)
                self._cond.notify_all()
