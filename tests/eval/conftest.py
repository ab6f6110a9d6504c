import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """`openpi-rl eval` run in-process configures structlog onto pytest's captured stderr,
    which is closed after the test: later tests would log into a closed file."""
    yield
    structlog.reset_defaults()
