"""Reward providers: where the scalar reward for one (observation, action chunk) comes from.

Owns the `RewardProvider` interface and its implementations: a human at the terminal
(`HumanRewardCLI`), a human behind a WebSocket or HTTP feedback server (`HumanRewardWebSocket`,
`HumanRewardHTTP`), a Python function (`ExternalReward`) and a weighted sum of these
(`CompositeReward`). The rollout loop calls `provider.get(observation, actions)`; nothing here
knows about models or PPO.

Every built-in provider returns a finite Python float clamped to its `RewardConfig` range;
a value that is not a single finite number raises `RewardError` naming the provider.

Wire format (WebSocket message and HTTP POST body, both UTF-8 JSON), as in the design doc:

    request:  {"observation": {...}, "actions": [[...], ...]}
    reply:    {"reward": <number>}    or    {"error": {"code": ..., "message": ...}}

In the request, numpy (and JAX) arrays become nested lists, numpy scalars Python numbers,
non-finite floats `null` (JSON has no NaN), `bytes` a base64 string (standard alphabet,
padded), nested dicts stay dicts and tuples become lists.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import http.client
import importlib
import json
import math
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np
import structlog
import websockets.exceptions
import websockets.sync.client

logger = structlog.get_logger(__name__)

RewardFn = Callable[[dict, np.ndarray], Any]


class RewardError(ValueError):
    """A reward could not be obtained, or the value obtained is not a finite number."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The range every provider clamps its reward to."""

    min_reward: float = -1.0
    max_reward: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_reward) and math.isfinite(self.max_reward)):
            raise ValueError(
                f"RewardConfig: expected finite bounds, got [{self.min_reward}, {self.max_reward}]"
            )
        if self.min_reward > self.max_reward:
            raise ValueError(
                f"RewardConfig: expected min_reward <= max_reward, "
                f"got [{self.min_reward}, {self.max_reward}]"
            )

    def clamp(self, value: float) -> float:
        return min(max(value, self.min_reward), self.max_reward)


def check_reward(value: Any, source: str) -> float:
    """Returns `value` as a finite Python float, or raises RewardError naming `source`.

    Accepts Python and numpy numbers (bools included) and arrays of exactly one element, so a
    function may return `np.float32(x)` or a `[1]`-shaped JAX array.
    """
    # np.asarray would turn "0.5" into a string array; refuse text before it gets that far.
    if value is None or isinstance(value, str | bytes):
        raise RewardError(f"{source}: expected a finite number, got {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # arbitrary objects may fail conversion in arbitrary ways
        raise RewardError(f"{source}: expected a finite number, got {value!r}") from e
    if arr.dtype.kind not in "biuf":
        raise RewardError(
            f"{source}: expected a finite number, got {type(value).__name__} {value!r:.80}"
        )
    if arr.size != 1:
        raise RewardError(
            f"{source}: expected a single number, got an array of shape {list(arr.shape)}"
        )
    reward = float(arr.reshape(()))
    if not math.isfinite(reward):
        raise RewardError(f"{source}: expected a finite number, got {reward}")
    return reward


class RewardProvider(abc.ABC):
    """Gives the scalar reward for one observation and the action chunk taken from it.

    Subclasses implement `_get`; `get` checks its value (one finite number, else RewardError)
    and clamps it to `self.config`. A subclass may instead override `get` itself, as the design
    doc's example does; it then does its own checking.
    """

    config: RewardConfig = RewardConfig()

    def __init__(self, config: RewardConfig = RewardConfig()) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that overrides `get` (the design doc's style) has no use for `_get`; make it
        # concrete so ABCMeta, which runs after this hook, does not refuse to instantiate it.
        if "get" in cls.__dict__ and getattr(cls._get, "__isabstractmethod__", False):
            cls._get = _unused_get  # type: ignore[method-assign]

    def get(self, observation: dict, actions: np.ndarray) -> float:
        """The reward for taking `actions` ([action_horizon, action_dim]) from `observation`."""
        reward = check_reward(self._get(observation, actions), repr(self))
        clamped = self.config.clamp(reward)
        if clamped != reward:
            logger.debug("reward.clamped", provider=repr(self), reward=reward, clamped=clamped)
        return clamped

    @abc.abstractmethod
    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        """The raw reward; `get` validates and clamps it."""

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Releases connections; idempotent. The base class holds none."""

    def __enter__(self) -> RewardProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return type(self).__name__


def _unused_get(self: RewardProvider, observation: dict, actions: np.ndarray) -> Any:
    raise NotImplementedError(f"{type(self).__name__} overrides get(); _get is not used")


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
        config: RewardConfig = RewardConfig(),
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
        config: RewardConfig,
        timeout_s: float,
        default_reward: float | None,
    ) -> None:
        super().__init__(config)
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"{type(self).__name__}: timeout_s must be > 0, got {timeout_s}")
        if default_reward is not None:
            default_reward = check_reward(default_reward, f"{type(self).__name__} default_reward")
        self.url = url
        self.timeout_s = timeout_s
        self.default_reward = default_reward

    def _on_timeout(self, cause: BaseException) -> float:
        if self.default_reward is None:
            raise RewardError(
                f"{self!r}: no reward from {self.url} within {self.timeout_s:g} s"
            ) from cause
        logger.warning(
            "reward.timeout_default",
            provider=type(self).__name__,
            url=self.url,
            timeout_s=self.timeout_s,
            default_reward=self.default_reward,
        )
        return self.default_reward

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url})"


class HumanRewardWebSocket(_RemoteReward):
    """Asks a feedback server over one long-lived WebSocket: one request message, one reply.

    The connection opens on first use and is reopened once if the server closed it. After a
    timeout it is dropped, so a late answer can never be taken as the reply to the next step.
    Only a missing reply counts as a timeout; a server that cannot be reached is a RewardError.
    """

    def __init__(
        self,
        url: str,
        config: RewardConfig = RewardConfig(),
        timeout_s: float = 30.0,
        default_reward: float | None = None,
    ) -> None:
        super().__init__(url, config, timeout_s, default_reward)
        self._conn: websockets.sync.client.ClientConnection | None = None

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
                    logger.info("reward.websocket_reconnect", url=self.url, reason=str(e))
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

    def __init__(
        self,
        url: str,
        config: RewardConfig = RewardConfig(),
        timeout_s: float = 30.0,
        default_reward: float | None = None,
    ) -> None:
        super().__init__(url, config, timeout_s, default_reward)

    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        request = urllib.request.Request(
            self.url,
            data=encode_request(observation, actions).encode("utf-8"),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
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


# --------------------------------------------------------------------------------------------
# Functions and combinations


class ExternalReward(RewardProvider):
    """Wraps a function `(observation, actions) -> float`, given as a callable or as an import
    path "package.module:function" (or "package.module.function")."""

    def __init__(
        self,
        fn: RewardFn | str,
        config: RewardConfig = RewardConfig(),
    ) -> None:
        super().__init__(config)
        if isinstance(fn, str):
            self._name = fn
            fn = import_function(fn)
        else:
            if not callable(fn):
                raise TypeError(f"ExternalReward: expected a callable or a string, got {fn!r}")
            self._name = getattr(fn, "__qualname__", repr(fn))
        self.fn = fn

    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        return self.fn(observation, actions)

    def __repr__(self) -> str:
        return f"ExternalReward({self._name})"


def import_function(path: str) -> Callable[..., Any]:
    """Resolves "package.module:attr.attr" or "package.module.function" to a callable."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise RewardError(
            f'reward function {path!r}: expected "module:function" or "module.function"'
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward function {path!r}: cannot import {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise RewardError(
                f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from e
    if not callable(obj):
        raise RewardError(f"reward function {path!r}: {type(obj).__name__} is not callable")
    return obj


class CompositeReward(RewardProvider):
    """The weighted sum of other providers' rewards, clamped to this provider's own range.

    Each part is queried in order and each value checked, so a bad part is named in the error.
    """

    def __init__(
        self,
        parts: Sequence[tuple[RewardProvider, float]],
        config: RewardConfig = RewardConfig(),
    ) -> None:
        super().__init__(config)
        parts = list(parts)
        if not parts:
            raise ValueError("CompositeReward: expected at least one (provider, weight) pair")
        for i, part in enumerate(parts):
            if not (isinstance(part, tuple | list) and len(part) == 2):
                raise ValueError(
                    f"CompositeReward parts[{i}]: expected (provider, weight), got {part!r}"
                )
            provider, weight = part
            if not isinstance(provider, RewardProvider):
                raise TypeError(
                    f"CompositeReward parts[{i}]: expected a RewardProvider, got {provider!r}"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
                raise ValueError(
                    f"CompositeReward parts[{i}]: weight must be a number, got {weight!r}"
                )
            if not math.isfinite(weight):
                raise ValueError(f"CompositeReward parts[{i}]: weight must be finite, got {weight}")
        self.parts = [(provider, float(weight)) for provider, weight in parts]

    def _get(self, observation: dict, actions: np.ndarray) -> float:
        return math.fsum(
            weight * check_reward(provider.get(observation, actions), repr(provider))
            for provider, weight in self.parts
        )

    def close(self) -> None:
        for provider, _ in self.parts:
            provider.close()

    def __repr__(self) -> str:
        return "CompositeReward(" + ", ".join(f"{p!r}*{w:g}" for p, w in self.parts) + ")"
