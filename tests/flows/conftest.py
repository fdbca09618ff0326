"""One Prefect test harness (temporary server + SQLite) shared by every flow test of the session."""

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """Start the harness once (~15 s), only when a flow test asks for it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
