"""Shared fixtures for the data tests: small datasets prepared once per session."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh TFDS data directory shared by the data tests of one session."""
    return str(tmp_path_factory.mktemp("tfds_data"))
