"""Human-feedback reward providers: a person at the terminal or behind a feedback server.

`HumanRewardCLI` prints a summary of the step (`summarize_step`) and reads a number typed at
the terminal. `HumanRewardWebSocket` and `HumanRewardHTTP` send the step to a feedback server
(the reward bridge's query mode, or any server speaking the format below) and wait for the
person's answer, with a timeout and an optional default reward.

Wire format (WebSocket message and HTTP POST body, both UTF-8 JSON), as in the design doc:

    request:  {"observation": {...}, "actions": [[...], ...]}
    reply:    {"reward": <number>}    or    {"error": {"code": ..., "message": ...}}

In the request, numpy (and JAX) arrays become nested lists, numpy scalars Python numbers,
non-finite floats `null` (JSON has no NaN), `bytes` a base64 string (standard alphabet,
padded), nested dicts stay dicts and tuples become lists.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
import structlog
import websockets.exceptions
import websockets.sync.client

from openpi_rl.rl.reward_base import RewardConfig, RewardError, RewardProvider, check_reward
from openpi_rl.secret import mask_url

logger = structlog.get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Human at the terminal


class HumanRewardCLI(RewardProvider):
    """Asks a human at the terminal: prints a summary of the step, reads a number.

    Re-asks until the answer is a finite number inside the config range. Raises RewardError at
    construction when stdin is not a terminal (a training job under nohup or CI would otherwise
    block or read garbage), unless `input_stream` is given explicitly; and on end of input.
    """

    def __init__(
        self,
        config: RewardConfig = RewardConfig(),  # noqa: B008 (RewardConfig is frozen)
        prompt: str = "Enter reward [{min_reward:g}, {max_reward:g}]: ",
        input_stream: TextIO | None = None,
        output_stream: TextIO | None = None,
    ) -> None:
        super().__init__(config)
        if input_stream is None:
            input_stream = sys.stdin
            if input_stream is None or not input_stream.isatty():
                raise RewardError(
                    "HumanRewardCLI: stdin is not a terminal, so nobody can type a reward; "
                    "run interactively, or use HumanRewardWebSocket / HumanRewardHTTP"
                )
        self._input = input_stream
        self._output = output_stream if output_stream is not None else sys.stdout
        self._prompt = prompt.format(min_reward=config.min_reward, max_reward=config.max_reward)

    def _get(self, observation: dict, actions: np.ndarray) -> float:
        self._write(summarize_step(observation, actions) + "\n")
        while True:
            self._write(self._prompt)
            line = self._input.readline()
            if not line:
                raise RewardError("HumanRewardCLI: end of input while waiting for a reward")
            answer = line.strip()
            try:
                reward = float(answer)
            except ValueError:
                self._write(f"Not a number: {answer!r}.\n")
                continue
            if not math.isfinite(reward):
                self._write(f"The reward must be finite, got {answer!r}.\n")
                continue
            if not self.config.min_reward <= reward <= self.config.max_reward:
                self._write(
                    f"Out of range: {reward:g} is not in "
                    f"[{self.config.min_reward:g}, {self.config.max_reward:g}].\n"
                )
                continue
            return reward

    def _write(self, text: str) -> None:
        self._output.write(text)
        self._output.flush()


def summarize_step(observation: Mapping[str, Any], actions: Any, max_values: int = 6) -> str:
    """A few lines a human can read: each observation key with its shape (and values when
    small), then the actions' shape and first numbers."""
    lines = ["Observation:"]
    for key, value in _flatten(observation):
        lines.append(f"  {key}: {_describe(value, max_values)}")
    lines.append(f"Actions: {_describe(actions, max_values)}")
    return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def _describe(value: Any, max_values: int) -> str:
    if isinstance(value, str | bytes):
        return f"{value!r:.60}"
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        return f"{type(value).__name__} {value!r:.60}"
    head = ", ".join(f"{x:.3g}" for x in arr.reshape(-1)[:max_values].tolist())
    if arr.ndim == 0:
        return head
    more = ", ..." if arr.size > max_values else ""
    return f"{arr.dtype} {list(arr.shape)} [{head}{more}]"


# --------------------------------------------------------------------------------------------
# Human behind a feedback server


def encode_request(observation: Mapping[str, Any], actions: Any) -> str:
    """The JSON request for one step; see the module docstring for the format."""
    payload = {
        "observation": _jsonable(observation, "observation"),
        "actions": _jsonable(actions, "actions"),
    }
    # allow_nan=False: _jsonable already turned NaN/inf into null, so this only guards it.
    return json.dumps(payload, allow_nan=False, separators=(",", ":"))


def _jsonable(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray | np.generic) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            # tolist() would keep NaN as a float, which json would write as invalid JSON.
            obj = arr.astype(object)
            obj[~np.isfinite(arr)] = None
            return obj.tolist()
        if arr.dtype.kind in "biuf":
            return arr.tolist()
        if arr.dtype.kind in "USO":
            return _jsonable(arr.tolist(), path)
        raise RewardError(f"{path}: cannot encode an array of dtype {arr.dtype} as JSON")
    raise RewardError(f"{path}: cannot encode {type(value).__name__} as JSON")


def decode_reply(text: str | bytes, source: str) -> Any:
    """The "reward" field of a JSON reply; RewardError on anything else. Not yet validated."""
    try:
        reply = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardError(f"{source}: reply is not JSON: {text[:200]!r}") from e
    if isinstance(reply, dict) and "error" in reply:
        raise RewardError(f"{source}: server answered with an error: {reply['error']!r:.300}")
    if not isinstance(reply, dict) or "reward" not in reply:
        raise RewardError(f'{source}: expected a reply {{"reward": <number>}}, got {reply!r:.200}')
    return reply["reward"]


class _RemoteReward(RewardProvider):
    """Shared timeout handling: a human who does not answer in time yields `default_reward`
    (with a warning) if one is set, else a RewardError."""

    def __init__(
        self,
        url: str,
        config: RewardConfig = RewardConfig(),  # noqa: B008 (RewardConfig is frozen)
        timeout_s: float = 30.0,
        default_reward: float | None = None,
        token: str | None = None,
    ) -> None:
        """`token`: the bridge's `query_token`, sent as `Authorization: Bearer` (never in the
        URL: proxies and logs keep URLs)."""
        super().__init__(config)
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"{type(self).__name__}: timeout_s must be > 0, got {timeout_s}")
        if default_reward is not None:
            default_reward = check_reward(default_reward, f"{type(self).__name__} default_reward")
        self.url = url
        self.shown_url = mask_url(url)  # for logs and errors: without its `?token=`
        self.timeout_s = timeout_s
        self.default_reward = default_reward
        self._headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    def _on_timeout(self, cause: BaseException) -> float:
        if self.default_reward is None:
            raise RewardError(
                f"{self!r}: no reward from {self.shown_url} within {self.timeout_s:g} s"
            ) from cause
        logger.warning(
            "reward.timeout_default",
            provider=type(self).__name__,
            url=self.shown_url,
            timeout_s=self.timeout_s,
            default_reward=self.default_reward,
        )
        return self.default_reward

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown_url})"


class HumanRewardWebSocket(_RemoteReward):
    """Asks a feedback server over one long-lived WebSocket: one request message, one reply.

    The connection opens on first use and is reopened once if the server closed it. After a
    timeout it is dropped, so a late answer can never be taken as the reply to the next step.
    Only a missing reply counts as a timeout; a server that cannot be reached is a RewardError.
    """

    _conn: websockets.sync.client.ClientConnection | None = None  # opened on first use

    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        message = encode_request(observation, actions)
        for attempt in range(2):
            conn = self._connect()
            try:
                conn.send(message)
                reply = conn.recv(timeout=self.timeout_s)
            except websockets.exceptions.ConnectionClosed as e:
                self._drop()
                if attempt == 0:
                    logger.info("reward.websocket_reconnect", url=self.shown_url, reason=str(e))
                    continue
                raise RewardError(f"{self!r}: connection closed twice in a row: {e}") from e
            except TimeoutError as e:
                self._drop()
                return self._on_timeout(e)
            return decode_reply(reply, repr(self))
        raise AssertionError("unreachable")

    def _connect(self) -> websockets.sync.client.ClientConnection:
        if self._conn is None:
            try:
                conn = websockets.sync.client.connect(
                    self.url,
                    open_timeout=self.timeout_s,
                    # Closing follows a timeout or shutdown; do not wait long on a busy server.
                    close_timeout=1.0,
                    # A human may take longer than a ping round to answer; the server's event
                    # loop may be blocked on input() meanwhile, so keepalive pings would fail.
                    ping_interval=None,
                    additional_headers=self._headers,
                )
            except (OSError, websockets.exceptions.WebSocketException) as e:
                raise RewardError(f"{self!r}: cannot connect: {e}") from e
            # websockets >= 17.1 warns about connections not entered as context managers; this
            # one is held across calls and closed by _drop.
            self._conn = conn.__enter__()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._drop()


class HumanRewardHTTP(_RemoteReward):
    """Asks a feedback server with one HTTP POST per step (JSON body, JSON reply).

    `timeout_s` bounds each socket operation (connect, and the wait for the reply), which for
    a human-paced server is the wait for the answer.
    """

    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        request = urllib.request.Request(
            self.url,
            data=encode_request(observation, actions).encode("utf-8"),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                **self._headers,
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise RewardError(f"{self!r}: HTTP {e.code} {e.reason}: {detail}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                return self._on_timeout(e)
            raise RewardError(f"{self!r}: cannot reach server: {e.reason}") from e
        except TimeoutError as e:  # urlopen lets a timeout waiting for the response through
            return self._on_timeout(e)
        except (OSError, http.client.HTTPException) as e:  # e.g. the server hung up
            raise RewardError(f"{self!r}: request failed: {e!r}") from e
        return decode_reply(body, repr(self))
