"""The learner rides out a restart of its replay's PostgreSQL server (`kill -9` of the postmaster,
then crash recovery, as systemd would restart it): no exception while the database is away, and
once it is back the learner reconnects and trains on, each chunk once."""

import numpy as np
from learner_helpers import Recorder, learner_config

from openpi_rl.daemon import Learner
from openpi_rl.replay import ReplayReader


def test_a_learner_waits_out_a_killed_database_and_trains_on_after_its_restart(
    tmp_path, own_cluster
):
    url = own_cluster.create_database()
    rec = Recorder(url)
    learner = Learner(learner_config(tmp_path, replay_dir=url))
    rng = np.random.default_rng(0)
    try:
        rec.episode("r", "a", 6, rng)
        rec.writer.flush()
        assert learner.step().version == 1
        own_cluster.kill()
        assert learner.step() is None  # a turn without data, not a crash
        assert learner.step() is None
        own_cluster.restart()
        ids = rec.episode("r", "b", 6, rng)
        rec.writer.flush(timeout=30)  # the server's writer reconnects too
        result = learner.step()  # the learner's connections reconnect on their next query
        assert result.published and result.version == 2
        assert learner.counters["transitions_trained"] == 12  # "a" was not trained again
        assert learner.step() is None
        with ReplayReader(url) as reader:
            assert [t.id for t in reader.transitions(episode_id="b") if t.consumed] == ids
    finally:
        learner.close()
        rec.close()
