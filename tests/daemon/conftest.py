import pytest
from learner_helpers import Recorder


@pytest.fixture
def recorder(request, tmp_path):
    """A replay at tmp_path/replay written by a real ReplayWriter, as the policy server does;
    `rec.location`. Parametrized indirectly with "postgres": in a fresh PostgreSQL database."""
    backend = getattr(request, "param", "sqlite")
    where = request.getfixturevalue("pg_url") if backend == "postgres" else tmp_path / "replay"
    rec = Recorder(where)
    yield rec
    rec.close()
