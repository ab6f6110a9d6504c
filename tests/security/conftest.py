import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_to_this_tests_output():
    """Log through structlog's defaults (print to the current sys.stdout), whatever an earlier
    test configured: the token tests read the log output back."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
