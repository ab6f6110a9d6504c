import pytest
from learner_helpers import Recorder


@pytest.fixture
def recorder(tmp_path):
    """A replay at tmp_path/replay written by a real ReplayWriter, as the policy server does."""
    rec = Recorder(tmp_path / "replay")
    yield rec
    rec.close()
