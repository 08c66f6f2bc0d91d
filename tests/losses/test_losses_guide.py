"""docs/guide/losses.md: its ```python blocks run, in order, in one namespace."""

import pytest


@pytest.mark.slow
def test_guide_code_blocks_run(n_devices, run_guide):
    run_guide("losses", min_blocks=5)
