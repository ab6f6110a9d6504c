"""A replay connection outlives a restart of its PostgreSQL server (`kill -9` of the postmaster,
then crash recovery): a reader's next query goes out on a new connection, while a transaction
the restart cut off fails rather than going on outside its transaction."""

import numpy as np
import psycopg
import pytest

from openpi_rl.replay import ReplayConfig, ReplayReader, store


def test_a_reader_opened_before_a_restart_reads_after_it(own_cluster):
    url = own_cluster.create_database()
    w = ReplayConfig(path=url).create()
    try:
        obs = b"\x80"  # an empty msgpack map
        a = np.zeros((2, 1), np.float32)
        w.append_transition("r", "e", 0, 0, obs, a, a, 0.0, 0.0, t_mono=0.0)
        w.flush()
        idle, reader, conn = ReplayReader(url), ReplayReader(url), store.connect(url, write=True)
        store.begin_write(conn)
        own_cluster.kill()
        with pytest.raises(psycopg.OperationalError):
            reader.count()  # while the server is down: the error, no hang
        own_cluster.restart()
        assert reader.count() == 1  # its connection was lost: a new one answers
        assert idle.count() == 1  # its connection was dropped unused: the query is sent again
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT count(*) FROM transitions")  # its transaction is gone
        store.begin_write(conn)  # a new transaction may start on a new connection
        conn.execute("COMMIT")
        for c in (idle, reader, conn):
            c.close()
    finally:
        w.close()
