"""Hot-swap in the policy server (guarantee 3): a real server thread, a real ZMQ publisher and
real orbax versions on disk, robots on real sockets; the admin endpoint over ZMQ and its CLI."""

import os
import subprocess
import sys
import threading
import time
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.policy_server.admin import AdminEndpoint, admin_request
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.policy_server.swapper import SwapOptions, Swapper
from openpi_rl.weights import Publisher, VersionCheckpoints
from openpi_rl_client import PolicyClient

CONFIG = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4, hidden=(32, 32))
TOKEN = "test-admin-token"


class Rig:
    """Server + swapper + admin in this process, following a publisher that writes versions
    into a real checkpoint directory, as the learner does."""

    def __init__(self, tmp_path, **swap):
        self.ac = build_actor_critic(CONFIG, (16,), 0)
        self.server = PolicyServer(self.ac, ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=4))
        self.publisher = Publisher("tcp://127.0.0.1:*", heartbeat_s=0.5)
        self.checkpoints = VersionCheckpoints(tmp_path / "ckpt", max_to_keep=50)
        self.save(0)
        options = SwapOptions(
            learner_endpoint=self.publisher.endpoint,
            checkpoint_dir=str(tmp_path / "ckpt"),
            **swap,
        )
        self.swapper = Swapper(self.server, options)
        self.admin = AdminEndpoint(self.swapper, "tcp://127.0.0.1:*", TOKEN)
        self.thread = threading.Thread(target=self.server.run, name="server", daemon=True)
        self.thread.start()
        assert self.server.wait_ready(60)
        self.swapper.start()
        self.admin.start()
        self.compiled = self.server.snapshot.compilations

    def weights(self, version: int, scale: float = 0.05):
        rng = np.random.default_rng(version)
        state = nnx.state(self.ac)
        return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), state)

    def save(self, version: int, weights=None) -> str:
        weights = self.weights(version) if weights is None else weights
        return str(self.checkpoints.save(version, weights, {"step": np.zeros(())}, {}))

    def publish(self, version: int, weights=None) -> None:
        self.save(version, weights)
        self.publisher.publish(version)

    def wait_live(self, version: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.server.snapshot.version != version:
            assert time.monotonic() < deadline, (
                f"live {self.server.snapshot.version}, not {version}"
            )
            time.sleep(0.01)

    def went_round(self, timeout_s: float = 5.0) -> None:
        """Wait until the swapper reads one more learner heartbeat (they come every 0.5 s): its
        loop came round, so whatever it does with the notices it already holds is done."""
        sub = self.swapper.notices
        before = sub.heartbeats
        deadline = time.monotonic() + timeout_s
        while sub.heartbeats == before:
            assert time.monotonic() < deadline, "the swapper read no heartbeat"
            time.sleep(0.01)

    def admin_call(self, command: str, version: int | None = None, token: str = TOKEN) -> dict:
        return admin_request(self.admin.endpoint, token, command, version, timeout_s=30)

    def metric(self, name: str, labels: dict | None = None) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels or {})

    def close(self) -> None:
        self.admin.close()
        self.swapper.close()
        self.server.close(wait_s=30)
        self.thread.join(30)
        self.publisher.close()
        self.checkpoints.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


class Robots:
    """n robots in threads, each infer + report as fast as replies come, recording every
    reply's version and every failure."""

    def __init__(self, endpoint: str, n: int = 3, episode_len: int = 5, reward=lambda r, v: 0.0):
        self.versions: dict[str, list[int]] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(endpoint, f"r{i}", episode_len, reward))
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _run(self, endpoint: str, name: str, episode_len: int, reward) -> None:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        seen = self.versions.setdefault(name, [])
        with PolicyClient(endpoint, robot_id=name, timeout_s=5.0, retries=0) as client:
            step, episode = 0, 0
            while not self._stop.is_set():
                try:
                    obs = {"state": rng.standard_normal(6).astype(np.float32)}
                    out = client.infer(obs, episode_id=f"{name}-{episode}")
                    seen.append(out.policy_version)
                    step += 1
                    done = step == episode_len
                    client.report(out.transition_id, reward(name, out.policy_version), done=done)
                    if done:
                        step, episode = 0, episode + 1
                except Exception as e:  # counted: the test expects none
                    self.failures.append(repr(e))
                time.sleep(0.002)

    def latest(self) -> set[int]:
        return {v[-1] for v in self.versions.values() if v}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_versions_swap_between_batches_without_compiling_or_failing(rig):
    robots = Robots(rig.server.endpoint)
    try:
        for v in range(1, 6):
            time.sleep(0.3)
            rig.publish(v)
            rig.wait_live(v)
        deadline = time.monotonic() + 10
        while robots.latest() != {5}:
            assert time.monotonic() < deadline, robots.latest()
            time.sleep(0.01)
    finally:
        robots.stop()
    assert robots.failures == []
    for seen in robots.versions.values():
        assert seen == sorted(seen), "a robot saw an older version after a newer one"
        assert set(seen) >= {0, 5}
    assert rig.server.snapshot.compilations == rig.compiled  # swaps reuse the executables
    assert rig.metric("openpi_rl_server_compilations") == rig.compiled
    assert rig.metric("openpi_rl_server_swaps_total") == 5
    assert rig.metric("openpi_rl_server_swap_seconds_count") == 5
    assert rig.metric("openpi_rl_server_policy_version") == 5
    assert rig.metric("openpi_rl_server_versions_behind") == 0
    assert rig.metric("openpi_rl_server_seconds_since_swap") < 5
    with PolicyClient(rig.server.endpoint, robot_id="h") as client:
        health = client.health()
    assert health["policy_version"] == 5 and health["learner"]["version"] == 5
    assert health["learner"]["alive"] and health["versions_behind"] == 0

    # A burst of 20 notices: the single slot keeps the newest, nothing queues.
    for v in range(6, 26):
        rig.save(v)
    for v in range(6, 26):
        rig.publisher.publish(v)
    rig.wait_live(25)
    rig.went_round()
    assert rig.swapper.swaps < 5 + 20, rig.swapper.swaps
    assert rig.server.snapshot.version == 25


def test_bad_versions_are_refused_and_a_dead_learner_shows_within_3s(rig):
    nan = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), nnx.state(rig.ac))
    deadline = time.monotonic() + 10
    rig.publish(1, nan)
    while len(rig.swapper.failed) < 1:  # one at a time: the slot would skip 1 for 2
        assert time.monotonic() < deadline, rig.swapper.failed
        time.sleep(0.02)
    rig.publisher.publish(2)  # announced, never written
    while len(rig.swapper.failed) < 2:
        assert time.monotonic() < deadline, rig.swapper.failed
        time.sleep(0.02)
    assert rig.server.snapshot.version == 0
    assert rig.metric("openpi_rl_server_swap_failures_total", {"reason": "nonfinite"}) == 1
    assert rig.metric("openpi_rl_server_swap_failures_total", {"reason": "restore"}) == 1
    with PolicyClient(rig.server.endpoint, robot_id="h") as client:
        assert client.infer({"state": np.zeros(6, np.float32)}).policy_version == 0
    rig.publish(3)
    rig.wait_live(3)

    # Then the learner dies: no more heartbeats, and serving goes on.
    with PolicyClient(rig.server.endpoint, robot_id="h", timeout_s=5.0) as client:
        assert client.health()["learner"]["alive"]
        assert rig.metric("openpi_rl_server_learner_up") == 1
        rig.publisher.close()
        t0 = time.monotonic()
        while client.health()["learner"]["alive"]:
            assert time.monotonic() - t0 < 3.0, "a dead learner still shows alive after 3 s"
            time.sleep(0.05)
        assert rig.metric("openpi_rl_server_learner_up") == 0
        assert rig.metric("openpi_rl_server_learner_heartbeat_age_seconds") >= 1.5
        out = client.infer({"state": np.zeros(6, np.float32)})  # the last good version serves
        assert out.policy_version == 3


def test_admin_pin_unpin_rollback_and_pause(rig):
    for v in (1, 2):
        rig.publish(v)
    rig.wait_live(2)

    assert rig.admin_call("status", token="wrong")["error"]["code"] == "unauthorized"
    assert rig.admin_call("dance")["error"]["code"] == "invalid_field"
    assert rig.admin_call("pin", -3)["error"]["code"] == "invalid_field"
    missing = rig.admin_call("pin", 99)["error"]
    assert missing["code"] == "internal" and "not in" in missing["message"]
    from openpi_rl_client import wire

    assert rig.admin.handle(b"\xc1garbage")["error"]["code"] == "bad_message"
    assert rig.admin.handle(wire.packb([1, 2]))["error"]["code"] == "bad_message"

    status = rig.admin_call("pin", 1)["status"]
    assert status["policy_version"] == 1 and status["pinned"] == 1
    rig.publish(3)  # a pinned server ignores newer versions
    deadline = time.monotonic() + 10
    while rig.swapper.newest is None or rig.swapper.newest[0] != 3:  # the notice arrived
        assert time.monotonic() < deadline, rig.swapper.status()
        time.sleep(0.01)
    rig.went_round()  # and the swapper decided on it
    assert rig.server.snapshot.version == 1
    assert rig.admin_call("status")["status"]["versions_behind"] == 2
    rig.admin_call("unpin")
    rig.wait_live(3)

    status = rig.admin_call("rollback")["status"]  # back to the newest good older version
    assert status["policy_version"] == 2 and status["pinned"] == 2 and status["rejected"] == [3]
    assert rig.metric("openpi_rl_server_rollbacks_total", {"trigger": "admin"}) == 1
    rig.admin_call("unpin")
    rig.went_round()
    assert rig.server.snapshot.version == 2  # 3 was rolled back from: never followed again
    rig.publish(4)
    rig.wait_live(4)

    assert rig.admin_call("pause-learning")["status"]["learning_paused"] is True
    with PolicyClient(rig.server.endpoint, robot_id="learner") as client:
        assert client.health()["learning_paused"] is True  # what the learner reads
        rig.admin_call("resume-learning")
        assert client.health()["learning_paused"] is False
    assert rig.metric("openpi_rl_server_admin_requests_total", {"command": "pin", "outcome": "ok"})
    assert rig.server.snapshot.compilations == rig.compiled

    # The CLI: the reply as JSON, exit 0 / 1 by outcome, the token never echoed.
    cmd = [
        sys.executable,
        "-m",
        "openpi_rl.cli",
        "admin",
        "status",
        "--endpoint",
        rig.admin.endpoint,
    ]
    env = {**os.environ, "OPENPI_RL_ADMIN_TOKEN": TOKEN}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"policy_version": 4' in out.stdout
    bad = subprocess.run([*cmd, "--token", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unauthorized" in bad.stdout
    assert TOKEN not in bad.stdout + bad.stderr


def test_auto_rollback_when_a_new_version_earns_less(tmp_path):
    """Episodes under version 1 return 0 where version 0's returned 1: with K=3 and margin 0.5
    the server rolls back to 0 by itself and stays there."""
    rig = Rig(tmp_path, auto_rollback_episodes=3, auto_rollback_margin=0.5)
    robots = Robots(
        rig.server.endpoint, n=2, episode_len=3, reward=lambda r, v: 0.4 if v == 0 else 0.0
    )
    try:
        deadline = time.monotonic() + 20
        while len(rig.server.returns.last(0, 3)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rig.publish(1)
        rig.wait_live(1)
        deadline = time.monotonic() + 20
        while rig.metric("openpi_rl_server_rollbacks_total", {"trigger": "auto"}) != 1:
            assert time.monotonic() < deadline, rig.server.returns.last(1, 3)
            time.sleep(0.02)
        assert rig.server.snapshot.version == 0 and rig.swapper.pinned == 0
        assert rig.swapper.rejected == {1}
    finally:
        robots.stop()
        rig.close()
    assert robots.failures == []


def test_a_restarted_server_starts_at_the_newest_version_on_disk(tmp_path):
    ac = build_actor_critic(CONFIG, (16,), 0)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt")
    for v in range(3):
        weights = jax.tree.map(lambda x, v=v: x + v, nnx.state(ac))
        checkpoints.save(v, weights, {"step": np.zeros(())}, {})
    checkpoints.close()
    (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1").mkdir()  # a save cut short: not a version
    server = PolicyServer(ac, ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=2))
    options = SwapOptions(
        learner_endpoint=None, checkpoint_dir=str(tmp_path / "ckpt"), restore_in_worker=False
    )
    swapper = Swapper(server, options)
    obs = {"state": np.ones(6, np.float32)}

    def value_at(shift: float) -> float:
        expected = build_actor_critic(CONFIG, (16,), 0)
        nnx.update(expected, jax.tree.map(lambda x: x + shift, nnx.state(expected)))
        return expected.value(jax.random.key(0), {"state": obs["state"][None]})[0]

    try:
        assert server.snapshot.version == 2  # before warm-up: robots never see version 0
        server.warm_up()
        assert server.snapshot.compilations == 2  # sizes 1 and 2, nothing more
        np.testing.assert_allclose(server.snapshot.sample(0, [obs]).value[0], value_at(2), 1e-5)
        swapper.pin(1)  # restored in this process (restore_in_worker=False): no worker
        assert swapper.restore_worker is None and server.snapshot.version == 1
        np.testing.assert_allclose(server.snapshot.sample(0, [obs]).value[0], value_at(1), 1e-5)
        assert server.snapshot.compilations == 2
    finally:
        swapper.close()
        server.close()  # never ran: released here


def _send_raw(rig: Rig, msg) -> None:
    """A notice as anyone on the channel could send it (the learner's socket, our bytes)."""
    from openpi_rl_client import wire

    rig.publisher.send_raw(wire.packb(msg))


def _wait_subscribed(rig: Rig) -> None:
    deadline = time.monotonic() + 10
    while rig.swapper.notices.heartbeats == 0:  # PUB drops what it sends before the SUB joins
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.02)


def test_notices_naming_a_path_outside_checkpoint_dir_or_an_absurd_version_are_refused(
    rig, tmp_path
):
    """A notice names a version; the server loads it from its own checkpoint_dir only. A path
    elsewhere (a complete, loadable version there), `../`, absurd or far-future versions: each
    refused and counted, the live version serves on, and the next good notice still goes live."""
    elsewhere = VersionCheckpoints(tmp_path / "elsewhere")
    elsewhere.save(1, rig.weights(1, scale=3.0), {"step": np.zeros(())}, {})
    elsewhere.close()
    _wait_subscribed(rig)
    ckpt = rig.checkpoints.directory
    deadline = time.monotonic() + 10
    for n, path in enumerate((tmp_path / "elsewhere" / "1", f"{ckpt}/../elsewhere/1"), 1):
        _send_raw(rig, {"type": "version", "version": 1, "path": str(path)})
        while rig.metric("openpi_rl_server_swap_failures_total", {"reason": "path"}) != n:
            assert time.monotonic() < deadline, rig.swapper.status()
            time.sleep(0.02)
    for bad in (2**40, -1, True, "7", None, 3.5):
        _send_raw(rig, {"type": "version", "version": bad})
    _send_raw(rig, {"type": "version", "version": 5000})  # far past the newest on disk (0)
    _send_raw(rig, b"\xc1 not msgpack")
    # Six bad versions and the garbage are dropped as malformed; every notice sent was read
    # once the garbage, the last one, is counted.
    while rig.swapper.notices.malformed != 7:
        assert time.monotonic() < deadline, rig.swapper.notices.malformed
        time.sleep(0.02)
    rig.went_round()
    assert rig.metric("openpi_rl_server_swap_failures_total", {"reason": "version"}) == 1
    assert rig.server.snapshot.version == 0
    with PolicyClient(rig.server.endpoint, robot_id="h") as client:
        assert client.infer({"state": np.zeros(6, np.float32)}).policy_version == 0
    rig.publish(1)  # our own version 1, in checkpoint_dir: followed as ever
    rig.wait_live(1)
    assert rig.metric("openpi_rl_server_swap_failures_total", {"reason": "path"}) == 2


def test_a_version_whose_files_changed_after_publishing_is_refused(rig, tmp_path):
    """Version 1's weights replaced (by other, loadable weights) after the learner wrote its
    manifest: the content hash refuses it, the server stays on 0, then follows version 2."""
    import shutil

    other = VersionCheckpoints(tmp_path / "other")
    other.save(1, rig.weights(1, scale=3.0), {"step": np.zeros(())}, {})
    other.close()
    rig.save(1)
    shutil.rmtree(rig.checkpoints.directory / "1" / "weights")
    shutil.copytree(
        tmp_path / "other" / "1" / "weights", rig.checkpoints.directory / "1" / "weights"
    )
    rig.publisher.publish(1)
    deadline = time.monotonic() + 10
    while 1 not in rig.swapper.failed:
        assert time.monotonic() < deadline, rig.swapper.status()
        time.sleep(0.02)
    assert "hash" in rig.swapper.failed[1]
    assert rig.metric("openpi_rl_server_swap_failures_total", {"reason": "hash"}) == 1
    assert rig.server.snapshot.version == 0
    rig.publish(2)
    rig.wait_live(2)


def test_keep_versions_never_deletes_the_pinned_version_or_the_rollback_target(rig, tmp_path):
    for v in (1, 2, 3):
        rig.publish(v)
    rig.wait_live(3)
    assert rig.admin_call("rollback")["status"]["policy_version"] == 2  # the rollback target
    assert rig.admin_call("pin", 1)["status"]["pinned"] == 1
    learner_side = VersionCheckpoints(tmp_path / "ckpt", max_to_keep=2)  # keep_versions = 2
    try:
        for v in range(4, 9):
            learner_side.save(v, rig.weights(v), {"step": np.zeros(())}, {})
        assert learner_side.versions() == [1, 2, 7, 8]
    finally:
        learner_side.close()


@pytest.mark.parametrize("in_worker, check_delta_call", [(True, False), (False, True)])
def test_a_lora_delta_swap_reads_and_replaces_only_the_delta(tmp_path, in_worker, check_delta_call):
    """Versions after 0 hold only what trained (here the value head, as a LoRA learner's hold
    LoRA + value head) and name version 0 as their base. The server started on its seed's
    weights (not known to be version 0's), so the first delta loads with its base; from then on
    only the delta's arrays are read and placed, and every other array of the new snapshot is
    the live one's own object. A delta whose base is not the live one and is gone from disk is
    refused ("hash"); retention keeps a base that kept versions refer to."""
    import shutil

    from openpi_rl.models.finetune import CRITIC

    rig = Rig(tmp_path, restore_in_worker=in_worker, check_delta_call=check_delta_call)
    n_leaves = len(jax.tree.leaves(rig.server.snapshot.state))

    def head(version: int) -> nnx.State:
        ac = build_actor_critic(CONFIG, (16,), 0)
        nnx.update(ac, rig.weights(version))
        return nnx.state(ac, CRITIC)

    def expected(version: int) -> list[np.ndarray]:
        ac = build_actor_critic(CONFIG, (16,), 0)
        nnx.update(ac, rig.weights(0))
        nnx.update(ac, head(version))
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(ac))]

    def publish_delta(version: int) -> None:
        rig.checkpoints.save(version, head(version), {"step": np.zeros(())}, {}, base=0)
        rig.publisher.publish(version)

    def live() -> list:
        return jax.tree.leaves(rig.server.snapshot.state)

    try:
        n_head = len(jax.tree.leaves(head(1)))
        publish_delta(1)
        rig.wait_live(1)
        assert rig.swapper.last_restore == {
            "arrays": n_leaves, "bytes": rig.swapper.last_restore["bytes"], "delta_only": False,
        }  # fmt: skip
        assert rig.swapper.base[0] == 0
        assert all(np.array_equal(a, b) for a, b in zip(live(), expected(1), strict=True))
        before = live()
        full_bytes = rig.swapper.last_restore["bytes"]

        publish_delta(2)
        rig.wait_live(2)
        restore = rig.swapper.last_restore
        assert restore["delta_only"] and restore["arrays"] == n_head < n_leaves
        assert restore["bytes"] < full_bytes
        after = live()
        assert all(np.array_equal(a, b) for a, b in zip(after, expected(2), strict=True))
        shared = [a is b for a, b in zip(before, after, strict=True)]
        assert shared.count(False) == n_head and shared.count(True) == n_leaves - n_head
        assert rig.server.snapshot.compilations == rig.compiled

        # A delta is checked on its own arrays (the rest is the live, checked version): one
        # holding NaN is refused and the live version serves on.
        nan_head = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), head(3))
        rig.checkpoints.save(3, nan_head, {"step": np.zeros(())}, {}, base=0)
        rig.publisher.publish(3)
        wait_failed(rig, 3)
        assert rig.swapper.failed[3].startswith("nonfinite") and rig.server.snapshot.version == 2

        rig.publish(4)  # a full version: the live arrays' base from now on
        rig.wait_live(4)
        assert rig.swapper.base[0] == 4 and not rig.swapper.last_restore["delta_only"]
        rig.checkpoints.save(5, head(5), {"step": np.zeros(())}, {}, base=0)
        shutil.rmtree(rig.checkpoints.directory / "0")  # its base is gone
        rig.publisher.publish(5)
        wait_failed(rig, 5)
        assert (
            "hash" in rig.swapper.failed[5]
            and "base, version 0, is missing" in (rig.swapper.failed[5])
        )
        assert rig.server.snapshot.version == 4
    finally:
        rig.close()


def wait_failed(rig: Rig, version: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while version not in rig.swapper.failed:
        assert time.monotonic() < deadline, rig.swapper.status()
        time.sleep(0.02)


def test_retention_keeps_the_base_of_every_kept_delta(tmp_path):
    from openpi_rl.models.finetune import CRITIC

    ac = build_actor_critic(CONFIG, (16,), 0)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt", max_to_keep=2)
    try:
        checkpoints.save(0, nnx.state(ac), {"step": np.zeros(())}, {})
        for v in range(1, 5):
            checkpoints.save(v, nnx.state(ac, CRITIC), {"step": np.zeros(())}, {}, base=0)
        assert checkpoints.versions() == [0, 3, 4]
        checkpoints.save(5, nnx.state(ac), {"step": np.zeros(())}, {})  # a full version
        checkpoints.save(6, nnx.state(ac, CRITIC), {"step": np.zeros(())}, {}, base=5)
        assert checkpoints.versions() == [5, 6]
    finally:
        checkpoints.close()


def test_a_restarted_server_starts_on_a_delta_with_its_base_and_then_reads_deltas_alone(tmp_path):
    """The newest version on disk is a LoRA delta: the server starts on base + delta (before
    warm-up) and knows its base, so the next delta (pinned here) reads only its own arrays."""
    from openpi_rl.models.finetune import CRITIC

    ac = build_actor_critic(CONFIG, (16,), 0)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt")
    checkpoints.save(0, nnx.state(ac), {"step": np.zeros(())}, {})
    for v in (1, 2):
        head = jax.tree.map(lambda x, v=v: x + v, nnx.state(ac, CRITIC))
        checkpoints.save(v, head, {"step": np.zeros(())}, {}, base=0)
    checkpoints.close()
    server = PolicyServer(ac, ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=1))
    options = SwapOptions(
        learner_endpoint=None, checkpoint_dir=str(tmp_path / "ckpt"), restore_in_worker=False
    )
    swapper = Swapper(server, options)
    n_head = len(jax.tree.leaves(nnx.state(ac, CRITIC)))
    try:
        assert server.snapshot.version == 2 and swapper.base[0] == 0
        server.warm_up()
        swapper.pin(1)
        assert server.snapshot.version == 1
        assert swapper.last_restore["delta_only"] and swapper.last_restore["arrays"] == n_head
        expected = build_actor_critic(CONFIG, (16,), 0)
        nnx.update(expected, jax.tree.map(lambda x: x + 1, nnx.state(expected, CRITIC)))
        for got, want in zip(
            jax.tree.leaves(server.snapshot.state),
            jax.tree.leaves(nnx.state(expected)),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    finally:
        swapper.close()
        server.close()  # never ran: released here
