"""The online loop end to end: robots -> policy server -> replay -> learner -> new version ->
the server swaps it in and the robots' replies carry it, with no failed request; the
operator's pause reaches the learner through the server, and each side sees the other die."""

import time

import numpy as np
from service_helpers import (
    Robots,
    ServerRig,
    free_port,
    learner_config,
    start_learner_thread,
    wait_for,
)

from openpi_rl.replay import ReplayReader


def test_robots_server_replay_learner_and_back(tmp_path):
    t_start = time.monotonic()
    publish_port, server_port = free_port(), free_port()
    rig = ServerRig(tmp_path, publish_port, server_port)
    learner, thread = start_learner_thread(learner_config(tmp_path, publish_port, server_port))
    robots = Robots(rig.endpoint, n=2)
    try:
        # Two published versions, each swapped in and served to every robot.
        wait_for(lambda: robots.newest() >= 2, 45, lambda: f"robots at {robots.newest()}")
        assert rig.metric("openpi_rl_server_swaps_total") >= 2
        assert rig.server.snapshot.compilations == rig.swapper.server.snapshot.compilations

        # pause-learning reaches the learner (its heartbeat says so) and no version follows.
        rig.admin_call("pause-learning")
        wait_for(lambda: rig.swapper.learner_state() == "paused", 5, rig.swapper.learner_state)
        paused_at, served = learner.version, robots.requests()
        # Robots keep feeding the replay: four updates' worth of chunks (min_transitions 16)
        # arrive while the learner, paused at the top of each pass, starts none.
        wait_for(lambda: robots.requests() >= served + 64, 20, robots.requests)
        assert learner.version == paused_at and rig.live == paused_at
        assert learner.publisher.state == "paused"
        rig.admin_call("resume-learning")
        wait_for(lambda: robots.newest() > paused_at, 20, lambda: f"at {robots.newest()}")
    finally:
        robots.stop()
    assert robots.failures == [], robots.failures[:3]
    robots.assert_monotone()
    assert robots.requests() > 100

    # The server goes away: the learner's watch shows it down within 3 s.
    server_endpoint = f"tcp://127.0.0.1:{server_port}"
    assert learner.servers.alive(server_endpoint)
    up = ("openpi_rl_learner_server_up", {"endpoint": server_endpoint})
    assert learner.metrics.registry.get_sample_value(*up) == 1
    rig.close()
    seconds = wait_for(lambda: not learner.servers.alive(server_endpoint), 3.0)
    assert learner.metrics.registry.get_sample_value(*up) == 0
    learner.close()  # returns once run() has released the learner on its own thread
    thread.join(30)
    assert not thread.is_alive()

    reader = ReplayReader(str(tmp_path / "replay"))
    served_versions = {r.policy_version for r in reader.transitions()}
    # Every served chunk is logged with its version: the seed's, at least two published ones
    # (the swapper may skip a version published while it loaded the one before: newest only),
    # up to the newest any robot saw.
    assert 0 in served_versions and len(served_versions) >= 3, served_versions
    assert max(served_versions) == max(v[-1] for v in robots.versions.values() if v)
    # About 13 s on an idle 2-core machine (two JAX compilations included); the waits above
    # bound it by 75 s on a loaded one.
    print(f"server down seen after {seconds:.2f} s; whole test {time.monotonic() - t_start:.1f} s")
    assert np.isfinite(learner.metrics.registry.get_sample_value("openpi_rl_learner_version"))
