"""The learner's update, guard, behaviour cloning, checkpoints and publishing, on a real replay,
real orbax checkpoints and a real ZMQ SUB socket."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from learner_helpers import MODEL, Recorder, learner_config

from openpi_rl.daemon import Learner
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.models.pi0_fast import Pi0FASTConfig
from openpi_rl.rl import PPOBatch, PPOConfig, ppo_loss
from openpi_rl.weights import LatestVersion, restore_version


def _wait_heartbeat(sub: LatestVersion, timeout_s: float = 5.0) -> None:
    """PUB/SUB drops what is sent before the subscription lands: wait for proof that it has."""
    deadline = time.monotonic() + timeout_s
    while sub.last_heartbeat is None and time.monotonic() < deadline:
        sub.poll(0.1)
    assert sub.last_heartbeat is not None, "no heartbeat"


def _params(learner: Learner) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(learner.params)]


def test_notice_arrives_and_its_path_restores_into_a_fresh_actor_critic(tmp_path, recorder):
    learner = Learner(learner_config(tmp_path, heartbeat_s=0.1))
    sub = LatestVersion(learner.publisher.endpoint)
    try:
        _wait_heartbeat(sub)
        assert sub.last_heartbeat["type"] == "heartbeat"
        assert sub.last_heartbeat["version"] == 0 and sub.last_heartbeat["state"] == "starting"
        recorder.episode("r", "a", 6, np.random.default_rng(0))
        recorder.writer.flush()
        result = learner.step()
        assert result.published and result.version == 1
        notice = sub.poll(5.0)
        assert notice == {"version": 1, "path": None}  # a version, never a path
        beats = sub.heartbeats
        while sub.heartbeats < beats + 2:  # heartbeats name version 1 too: nothing newer
            assert sub.poll(0.05) is None

        fresh = build_actor_critic(MODEL, (16, 16), seed=123)  # other weights until restored
        obs = {"state": jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)}
        key = jax.random.key(7)
        assert not np.allclose(fresh.value(key, obs), learner.ac.value(key, obs))
        nnx.update(fresh, restore_version(tmp_path / "ckpt" / "1", fresh))
        for got, want in zip(fresh.act(key, obs), learner.ac.act(key, obs), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        sub.close()
        learner.close()


def test_heartbeat_every_interval(tmp_path):
    learner = Learner(learner_config(tmp_path, heartbeat_s=0.1))
    sub = LatestVersion(learner.publisher.endpoint)
    try:
        _wait_heartbeat(sub)
        first = sub.heartbeats
        time.sleep(1.0)
        sub.poll(0.0)
        assert 6 <= sub.heartbeats - first <= 12
    finally:
        sub.close()
        learner.close()


def test_a_dead_heartbeat_ends_the_learner_with_exit_1(tmp_path):
    """The servers follow the learner by its heartbeat: a learner whose heartbeat thread died
    would look dead to them while it trains on. It stops instead, so its supervisor restarts it."""
    learner = Learner(learner_config(tmp_path, heartbeat_s=0.05, poll_interval_s=0.05))
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(learner.run()), daemon=True)
    try:
        runner.start()
        deadline = time.monotonic() + 10
        while learner.publisher.state == "starting":  # run() sets "waiting" as it begins
            assert time.monotonic() < deadline and runner.is_alive(), result
            time.sleep(0.01)
        assert runner.is_alive()
        learner.publisher.socket.close()  # the heartbeat thread's socket fails: it ends
        runner.join(10.0)
        assert not runner.is_alive() and result == [1]
    finally:
        learner.close()


def test_close_on_runs_own_thread_takes_no_lock_so_a_signal_handler_cannot_deadlock_run(
    tmp_path, monkeypatch
):
    """`close()` runs in the SIGTERM handler, on the main thread, possibly while `run` is inside
    `Event.wait` holding that event's lock: a close that took it (or waited there for `run` to
    end) never returned (a CI learner hung until killed). Here `close()` is called on `run`'s
    own thread, as the handler is, from inside a pass of the loop; it must return at once, and
    then `run` must notice and return."""
    learner = Learner(learner_config(tmp_path, poll_interval_s=0.05))
    check, returned = learner.check_operator, threading.Event()

    def check_then_close():  # where a signal can land: between two steps of `run`
        check()
        learner.close()
        returned.set()

    monkeypatch.setattr(learner, "check_operator", check_then_close)
    runner = threading.Thread(target=learner.run, daemon=True)
    try:
        runner.start()
        assert returned.wait(5.0), "close() blocked on run's own thread"
        runner.join(5.0)
        assert not runner.is_alive(), "run() did not return after close()"
    finally:
        learner.close()


def test_nan_batch_is_refused_and_nothing_is_published(tmp_path, recorder):
    learner = Learner(learner_config(tmp_path, heartbeat_s=0.1))
    sub = LatestVersion(learner.publisher.endpoint)
    try:
        _wait_heartbeat(sub)
        recorder.episode("r", "a", 6, np.random.default_rng(0))
        recorder.writer.flush()
        batch, _ = learner.take()
        batch.rewards[2, 0] = np.nan  # e.g. a corrupt reward source
        before = _params(learner)
        result = learner.update_on(batch)
        assert not result.published and result.reason == "nonfinite"
        assert learner.counters["refused_nonfinite"] == 1 and learner.version == 0
        assert learner.checkpoints.versions() == [0]
        for a, b in zip(before, _params(learner), strict=True):
            np.testing.assert_array_equal(a, b)
        assert sub.poll(0.5) is None and learner.publisher.sent["version"] == 0
        assert sub.last_heartbeat["state"] == "refused"
        # The same data without the NaN trains and publishes.
        batch.rewards[2, 0] = 0.0
        assert learner.update_on(batch).published
        assert sub.poll(5.0)["version"] == 1
    finally:
        sub.close()
        learner.close()


def test_update_past_the_kl_limit_is_refused_and_its_data_consumed(tmp_path, recorder):
    learner = Learner(learner_config(tmp_path, max_kl=1e-9))
    try:
        recorder.episode("r", "a", 6, np.random.default_rng(0))
        recorder.writer.flush()
        result = learner.step()
        assert not result.published and result.reason == "kl" and result.metrics["update_kl"] > 0
        assert learner.counters["refused_kl"] == 1
        assert learner.counters["transitions_refused"] == 6
        assert learner.checkpoints.versions() == [0] and learner.publisher.sent["version"] == 0
        assert learner.step() is None  # consumed: not retried forever
    finally:
        learner.close()


def test_a_batch_target_kl_stops_before_its_first_step_publishes_no_version(tmp_path, recorder):
    """`ppo.target_kl` stops an update before its first step when the batch's behaviour is
    already that far from the policy: the weights did not change, so no version is published
    (it would only age the data in flight) and the data is counted stale, consumed."""
    ppo = PPOConfig(lr=1e-3, train_iters=2, minibatch_size=16, target_kl=1e-4)
    learner = Learner(learner_config(tmp_path, ppo=ppo))
    try:
        recorder.episode("r", "a", 16, np.random.default_rng(0))  # served by version 0 itself
        recorder.writer.flush()
        first = learner.step()
        assert first.published and first.metrics["update_fraction"] > 0

        other = build_actor_critic(MODEL, (16, 16), seed=123)  # another policy serves
        nnx.update(other, jax.tree.map(lambda x: 10 * x, nnx.state(other, nnx.Param)))
        recorder.ac = other
        recorder.episode("r", "b", 16, np.random.default_rng(1), version=1)
        recorder.writer.flush()
        result = learner.step()
        assert not result.published and result.reason == "unchanged" and result.version == 1
        assert learner.counters["unchanged_updates"] == 1
        assert learner.counters["transitions_stale"] == 16
        assert learner.checkpoints.versions() == [0, 1] and learner.publisher.sent["version"] == 1
        assert learner.step() is None  # consumed
    finally:
        learner.close()


def test_intervened_samples_are_out_of_the_ratio():
    """A take-over's stored log-prob is not the policy's: with policy_mask 0 it changes nothing
    in the clipped surrogate, KL or clip fraction, however far off it is."""
    ac = build_actor_critic(MODEL, (16, 16), 0)
    rng = np.random.default_rng(0)
    n = 32
    obs = {"state": jnp.asarray(rng.standard_normal((n, 3)), jnp.float32)}
    actions = jnp.asarray(rng.standard_normal((n, 2, 2)), jnp.float32)
    logp = ac.model.policy_logprobs(jax.random.key(0), obs, actions)
    intervened = np.arange(n) % 4 == 0
    old_logp = jnp.where(intervened, logp - 50.0, logp + 0.01 * jnp.arange(n))
    adv = jnp.asarray(rng.standard_normal(n), jnp.float32)
    full = PPOBatch(obs, actions, old_logp, adv * 0, adv, adv, policy_mask=1.0 - intervened)
    keep = ~intervened
    subset = PPOBatch(
        {"state": obs["state"][keep]}, actions[keep], old_logp[keep], adv[keep] * 0, adv[keep],
        adv[keep],
    )  # fmt: skip
    config = PPOConfig()
    _, m_full = ppo_loss(ac, jax.random.key(1), full, config)
    _, m_sub = ppo_loss(ac, jax.random.key(1), subset, config)
    for k in ("policy_loss", "approx_kl", "clip_fraction"):
        np.testing.assert_allclose(m_full[k], m_sub[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bc_coef", [1.0, 0.0])
def test_take_overs_train_behaviour_cloning(tmp_path, recorder, bc_coef):
    """Every chunk an operator took over, executing `target`: BC raises the policy's log-prob
    of the executed actions; with weight 0 the policy does not move at all."""
    rng = np.random.default_rng(0)
    target = np.full((2, 2), 0.8, np.float32)
    states = []
    for e in range(3):
        for t in range(5):
            obs = {"state": rng.standard_normal(3).astype(np.float32)}
            tid, _ = recorder.serve("r", f"e{e}", t, obs)
            recorder.writer.report(
                tid, 0.0, done=t == 4, truncated=False, executed_actions=target, intervened=True
            )
            states.append(obs["state"])
    recorder.writer.flush()
    ppo = PPOConfig(lr=1e-2, train_iters=4, minibatch_size=16, bc_coef=bc_coef, entropy_coef=0.0)
    learner = Learner(learner_config(tmp_path, ppo=ppo, max_kl=None))
    try:
        obs = {"state": jnp.asarray(np.stack(states))}
        executed = jnp.broadcast_to(jnp.asarray(target), (len(states), 2, 2))
        key = jax.random.key(0)
        before = np.asarray(learner.ac.model.policy_logprobs(key, obs, executed))
        result = learner.step()
        assert result.published
        after = np.asarray(learner.ac.model.policy_logprobs(key, obs, executed))
        if bc_coef > 0:
            assert after.mean() > before.mean() + 0.5, (before.mean(), after.mean())
            assert result.metrics["bc_loss"] > 0
        else:
            np.testing.assert_array_equal(after, before)
            assert result.metrics["approx_kl"] == 0.0  # no sample was in the ratio
    finally:
        learner.close()


def test_resume_picks_the_newest_version(tmp_path, recorder):
    rng = np.random.default_rng(0)
    config = learner_config(tmp_path)
    learner = Learner(config)
    for v in (1, 2):
        recorder.episode("r", f"e{v}", 6, rng, version=v - 1)
        recorder.writer.flush()
        assert learner.step().version == v
    weights, opt = _params(learner), jax.tree.leaves(learner.opt_state)
    learner.close()

    again = Learner(config)
    try:
        assert again.version == 2 and again.checkpoints.versions() == [0, 1, 2]
        assert again.counters["updates"] == 2 and again.counters["transitions_trained"] == 12
        for a, b in zip(weights, _params(again), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(opt, jax.tree.leaves(again.opt_state), strict=True):
            np.testing.assert_array_equal(a, b)
        recorder.episode("r", "e3", 6, rng, version=2)
        recorder.writer.flush()
        assert again.step().version == 3
    finally:
        again.close()


@pytest.mark.slow  # ~27 s on 2 cores: compiles pi0_fast's decoder and its learn step
def test_token_policy_ratio_is_exact_through_the_replay(tmp_path):
    """pi0_fast: the stored action tokens and log-prob reproduce the serving policy's log-prob
    exactly (gap 0 at version 0), and the published version restores into a fresh model."""
    model = Pi0FASTConfig(
        variant="dummy", action_horizon=2, action_dim=2, state_dim=3, image_keys=(), prompt_len=4
    )
    ac = build_actor_critic(model, (16, 16), 0)
    rec = Recorder(tmp_path / "replay", ac=ac)
    obs = {k: np.asarray(v)[0] for k, v in model.fake_obs(1).items()}
    for e in range(2):
        for t in range(4):
            tid, _ = rec.serve("r", f"e{e}", t, obs)
            rec.writer.report(tid, 0.1, done=t == 3, truncated=False)
    rec.close()
    ppo = PPOConfig(lr=1e-4, train_iters=1, minibatch_size=16)
    learner = Learner(learner_config(tmp_path, model=model, ppo=ppo, max_kl=None))
    try:
        result = learner.step()
        assert result.published and result.metrics["finite"] == 1.0
        assert result.metrics["behaviour_logp_gap"] < 1e-4
        fresh = build_actor_critic(model, (16, 16), seed=5)
        nnx.update(fresh, restore_version(result.path, fresh))
        batched = {k: jnp.asarray(v)[None] for k, v in obs.items()}
        key = jax.random.key(3)
        for got, want in zip(fresh.act(key, batched), learner.ac.act(key, batched), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        learner.close()


def test_a_corrupt_newest_version_resumes_from_the_previous_one(tmp_path, recorder):
    """Version 2's weights file garbled on disk: a restarted learner resumes from version 1's
    weights and optimiser state, logs and counts it, and publishes 3 next (2 is never reused)."""
    rng = np.random.default_rng(0)
    config = learner_config(tmp_path)
    learner = Learner(config)
    for v in (1, 2):
        recorder.episode("r", f"e{v}", 6, rng, version=v - 1)
        recorder.writer.flush()
        assert learner.step().version == v
        if v == 1:
            weights_1, opt_1 = _params(learner), jax.tree.leaves(learner.opt_state)
    learner.close()
    data = max(
        (p for p in (tmp_path / "ckpt" / "2" / "weights").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated

    again = Learner(config)
    try:
        assert again.version == 2  # the newest number: the next version is 3
        assert again.counters["corrupt_versions"] == 1
        assert (
            again.metrics.registry.get_sample_value("openpi_rl_learner_corrupt_versions_total") == 1
        )
        for a, b in zip(weights_1, _params(again), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(opt_1, jax.tree.leaves(again.opt_state), strict=True):
            np.testing.assert_array_equal(a, b)
        recorder.episode("r", "e3", 6, rng, version=2)
        recorder.writer.flush()
        assert again.step().version == 3
    finally:
        again.close()


def test_a_running_learner_trains_on_from_an_operator_rollback(tmp_path, recorder):
    """The server's admin wrote a rollback to version 1 while the learner runs: between updates
    the learner takes version 1's weights, and its next version is 3, not 2 again."""
    from openpi_rl.weights.operator_state import OperatorState, save_state

    rng = np.random.default_rng(0)
    learner = Learner(learner_config(tmp_path))
    try:
        for v in (1, 2):
            recorder.episode("r", f"e{v}", 6, rng, version=v - 1)
            recorder.writer.flush()
            assert learner.step().version == v
            if v == 1:
                weights_1 = _params(learner)
        save_state(tmp_path / "ckpt", OperatorState(pinned=1, rejected=(2,), rollback_target=1,
                                                    rollback_id=1))  # fmt: skip
        learner.check_operator()
        for a, b in zip(weights_1, _params(learner), strict=True):
            np.testing.assert_array_equal(a, b)
        learner.check_operator()  # applied once: nothing changes on a second look
        recorder.episode("r", "e3", 6, rng, version=1)
        recorder.writer.flush()
        result = learner.step()
        assert result.version == 3
        _, _, meta = learner.checkpoints.restore(
            3, nnx.state(learner.ac), jax.device_get(learner.opt_state)
        )
        assert meta["rollback_id"] == 1  # version 3 records the rollback it applied
    finally:
        learner.close()


def test_short_episodes_fill_a_batch_below_min_transitions_and_train(tmp_path, recorder):
    """Episodes shorter than a segment: a batch's columns hold fewer chunks than
    `min_transitions` however much is pending. Once that much is pending, the learner trains
    on full columns instead of waiting for ever."""
    learner = Learner(learner_config(tmp_path, batch_segments=4, min_transitions=16))
    rng = np.random.default_rng(0)
    try:
        for e in range(10):  # 10 episodes of 2 chunks: 20 pending, 4 columns of 2 per batch
            recorder.episode("r", f"e{e}", 2, rng)
        recorder.writer.flush()
        result = learner.step()
        assert result is not None and result.published, result
        assert result.transitions == 4 * 2
    finally:
        learner.close()
