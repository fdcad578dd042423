"""Shared test fixtures."""

import pytest

from tests.campaigns import write_planted_campaign


@pytest.fixture(scope="session")
def planted_campaign(tmp_path_factory):
    """One planted campaign (tests/campaigns.py) for the whole session: (logdir, data_root).

    Read-only: a test that changes a logdir writes its own with write_planted_campaign.
    """
    base = tmp_path_factory.mktemp("planted_campaign")
    logdir = write_planted_campaign(base / "logs", data_root=base / "data")
    return logdir, base / "data"
