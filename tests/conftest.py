"""Fixtures shared by the test modules.

Helpers that are plain functions live in data_fixtures (the toy embedding
pickles), run_fixtures (the toy run as a config or as flags, leo_tf commands
in a child process) and model_fixtures (small episodes and models).

Tests marked `slow` run what needs a process boundary or real sizes: child
processes that import TensorFlow, SIGKILL and multi-worker runs, the WRN-28-10
backbone. `python -m pytest -m "not slow"` leaves them out.
"""

import pytest

from tests import data_fixtures


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The data_path of data_fixtures' 'toy' set (16-d), written once per
    session. Shared: tests that change the data copy it first."""
    return data_fixtures.write_toy_dataset(tmp_path_factory.mktemp("toy_data"))
