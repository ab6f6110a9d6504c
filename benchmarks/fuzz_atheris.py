"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of the code that decodes
hostile bytes, next to the hypothesis-driven `fuzz_listeners.py` that attacks the sockets.

Targets, each with the property it checks on every input:
  wire       `openpi_rl_client.wire.unpackb` (the ZMQ protocol and openpi's WebSocket protocol)
             raises only `WireError`; what it decodes re-encodes with `packb` and decodes to
             the same tree (arrays: dtype, shape and bytes).
  bridge     a pendant frame / HTTP body as the bridge reads it: `events.parse_json`, then by
             "type": `parse_feedback` (an accepted event has a finite value within the cap
             and non-empty ids), `QueryBroker.answer`, or a reward query's `_summary` and
             `thumbnail`; only `BadRequest` may come out.
  http_head  `httpd._read_request` on the bytes then EOF: a request or an error reply, or the
             `IncompleteReadError` / `ValueError` the server handles (closes / 431).

Each target runs in a subprocess (libFuzzer ends its process when done): `-runs`, `-seed`, a
seed corpus of valid messages, our modules instrumented for coverage. tried = libFuzzer's
"Done N runs"; crashes = inputs that broke the property (first ones saved with their
traceback under --out). atheris is an optional extra: `pip install -e '.[fuzz]'`.

    .venv/bin/python benchmarks/fuzz_atheris.py            # 200,000 inputs per target
    .venv/bin/python benchmarks/fuzz_atheris.py --quick    # 3,000

The last line is one JSON object {target: {tried, crashes, ...}}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import tyro

TARGETS = ("wire", "bridge", "http_head")
MAX_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Args:
    runs: int = 200_000
    """Inputs per target (libFuzzer's -runs)."""
    quick: bool = False
    """Smoke run: 3,000 inputs per target."""
    seed: int = 1
    max_len: int = 4096
    """Longest input libFuzzer makes (bytes)."""
    max_total_time_s: int = 600
    """Per target, a bound in case a run is slower than expected."""
    targets: tuple[str, ...] = TARGETS
    out: str | None = None
    """Where failing inputs go (default: a temp dir, kept only if something failed)."""
    worker: str | None = None
    """Internal: run one target's fuzz loop in this process."""


# ---- the targets (run inside the worker, after instrumentation) --------------------------------


def _same(a: Any, b: Any) -> bool:
    """Structural equality with NaN == NaN and arrays compared by dtype, shape and bytes."""
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, np.generic) or isinstance(b, np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def wire_one(data: bytes) -> None:
    from openpi_rl_client import wire

    try:
        obj = wire.unpackb(data, max_bytes=MAX_BYTES)
    except wire.WireError:
        return
    again = wire.unpackb(wire.packb(obj))
    if not _same(obj, again):
        raise AssertionError(f"round trip changed the message: {obj!r:.200} -> {again!r:.200}")


_BROKER: Any = None


def bridge_one(data: bytes) -> None:
    from openpi_rl.reward_bridge import events, query
    from openpi_rl.reward_bridge.metrics import BridgeMetrics

    global _BROKER
    if _BROKER is None:
        _BROKER = query.QueryBroker(lambda m: None, BridgeMetrics(registry=None))
    try:
        msg = events.parse_json(data, MAX_BYTES)
        kind = msg.get("type", "feedback" if "kind" in msg else None)
        if kind == "feedback":
            ev = events.parse_feedback(msg, "op", 1.0, max_abs_value=10.0)
            if not (math.isfinite(ev.value) and abs(ev.value) <= 10.0):
                raise AssertionError(f"accepted value {ev.value!r}")
            if not (ev.robot_id and ev.idempotency_key):
                raise AssertionError(f"accepted empty ids: {ev!r:.200}")
        elif kind == "answer":
            _BROKER.answer(msg, "op")
        elif isinstance(msg.get("observation"), dict):  # a reward query (HumanRewardHTTP)
            query._summary(msg["observation"], msg.get("actions"))
            query.thumbnail(msg["observation"])
    except events.BadRequest:
        return


_LOOP: Any = None


def http_head_one(data: bytes) -> None:
    import asyncio

    from openpi_rl.reward_bridge import httpd

    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()

    async def read() -> Any:
        reader = asyncio.StreamReader(limit=1024)  # small, so the fuzzer reaches the limit
        reader.feed_data(data)
        reader.feed_eof()
        return await httpd._read_request(reader, max_body=512)

    try:
        out = _LOOP.run_until_complete(read())
    except (asyncio.IncompleteReadError, ValueError):
        return
    if isinstance(out, httpd.HttpResponse):
        if not 400 <= out.status < 500:
            raise AssertionError(f"framing error answered {out.status}")
    elif not isinstance(out, httpd.HttpRequest) or len(out.body) > 512:
        raise AssertionError(f"bad parse result {out!r:.200}")


def seeds(target: str) -> list[bytes]:
    """Valid messages for libFuzzer to start from."""
    import numpy as np

    from openpi_rl_client import wire

    if target == "wire":
        infer = {
            "type": "infer",
            "protocol_version": 1,
            "request_id": "r1",
            "robot_id": "arm",
            "episode_id": "e1",
            "observation": {
                "state": np.arange(4, dtype=np.float32),
                "image": np.zeros((2, 3, 3), np.uint8),
                "step": np.int64(3),
            },
            "prompt": "pick",
        }
        return [wire.packb(infer), wire.packb({"actions": np.ones((2, 7))}), wire.packb([1.5])]
    if target == "bridge":
        return [
            json.dumps(m).encode()
            for m in (
                {"type": "feedback", "robot_id": "r", "kind": "step_reward", "value": 0.5},
                {"robot_id": "r", "kind": "success", "episode_id": 7, "idempotency_key": "k"},
                {"type": "answer", "query_id": "q1", "reward": 1},
                {"observation": {"image": [[[0, 1, 2]] * 8] * 8}, "actions": [[0.1, 0.2]]},
                {"type": "subscribe", "robot_id": "r"},
            )
        ]
    body = b'{"robot_id": "r", "kind": "step_reward", "value": 1}'
    return [
        b"POST /feedback?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ]


def worker(target: str, out: Path, libfuzzer_args: list[str]) -> None:
    """Fuzz one target in this process; a failing input is saved and counted, and fuzzing
    goes on (so `crashes` counts inputs, not just the first)."""
    import atheris

    with atheris.instrument_imports(include=["openpi_rl_client"]):
        import openpi_rl_client.wire  # noqa: F401
    import openpi_rl

    with atheris.instrument_imports(include=["openpi_rl.reward_bridge"]):
        import openpi_rl.reward_bridge.events
        import openpi_rl.reward_bridge.httpd
        import openpi_rl.reward_bridge.query  # noqa: F401

    one = {"wire": wire_one, "bridge": bridge_one, "http_head": http_head_one}[target]
    failures = out / f"{target}.failures.jsonl"
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            sig = f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}"
            rec = {"signature": sig, "input_hex": data[:2048].hex(), "error": repr(e)[:300]}
            if sig not in seen:  # the traceback once per distinct place
                seen.add(sig)
                rec["traceback"] = traceback.format_exc()[-3000:]
            with failures.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    corpus = out / f"{target}.corpus"
    corpus.mkdir(exist_ok=True)
    for i, s in enumerate(seeds(target)):
        (corpus / f"seed{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], test_one_input)
    atheris.Fuzz()


# ---- the driver ---------------------------------------------------------------------------------


def run_target(target: str, args: Args, out: Path, runs: int) -> dict[str, Any]:
    lf = [
        f"-runs={runs}",
        f"-seed={args.seed + TARGETS.index(target)}",
        f"-max_len={args.max_len}",
        f"-max_total_time={args.max_total_time_s}",
        "-rss_limit_mb=4096",
        "-timeout=20",
        f"-artifact_prefix={out}/",
        "-print_final_stats=1",
    ]
    cmd = [sys.executable, __file__, "--worker", target, "--out", str(out), "--", *lf]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_total_time_s + 120)
    done = re.findall(r"Done (\d+) runs", proc.stderr)
    cov = re.findall(r"cov: (\d+)", proc.stderr)
    failures = out / f"{target}.failures.jsonl"
    recs = (
        [json.loads(line) for line in failures.read_text().splitlines()]
        if failures.exists()
        else []
    )
    sigs: dict[str, int] = {}
    for r in recs:
        sigs[r["signature"]] = sigs.get(r["signature"], 0) + 1
    result = {
        "tried": int(done[-1]) if done else 0,
        "crashes": len(recs) + int(proc.returncode != 0),
        "distinct_failures": sigs,
        "coverage_edges": int(cov[-1]) if cov else 0,
        "seconds": round(time.monotonic() - t0, 1),
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-1500:]
    return result


def main(args: Args, libfuzzer_args: list[str]) -> None:
    if args.worker is not None:
        worker(args.worker, Path(args.out or "."), libfuzzer_args)
        return
    try:
        import atheris  # noqa: F401
    except ImportError:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]'")
    runs = 3_000 if args.quick else args.runs
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fuzz_atheris_"))
    out.mkdir(parents=True, exist_ok=True)
    results = {t: run_target(t, args, out, runs) for t in args.targets}
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "stderr_tail"))
    if any(r["crashes"] for r in results.values()):
        print(f"failing inputs: {out}")
    print(json.dumps(results))


if __name__ == "__main__":
    # libFuzzer's own flags come after "--".
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    main(tyro.cli(Args, args=argv[:cut]), argv[cut + 1 :])
