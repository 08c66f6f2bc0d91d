"""Test set-up: 8 fake CPU devices so that sharding is exercised for real.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
Tests that need one device use ``jax.devices()[:1]`` explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TFDS quiet and offline.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def n_devices():
    n = jax.device_count()
    assert n == 8, f"tests expect 8 fake CPU devices, got {n}; is XLA_FLAGS overridden?"
    return n


@pytest.fixture(scope="session")
def run_guide():
    """``run_guide(name, min_blocks) -> namespace``: executes the ```python blocks of
    ``docs/guide/<name>.md`` in order in one namespace (the docs' code is tested as
    written); a failing block is reported with its index and source."""
    import pathlib
    import re

    def run(name: str, min_blocks: int = 1) -> dict:
        guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide" / f"{name}.md"
        blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
        assert len(blocks) >= min_blocks, f"{guide} has {len(blocks)} python blocks"
        namespace: dict = {"__name__": "guide"}
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"{guide.name}[block {i}]", "exec"), namespace)  # noqa: S102
            except Exception as err:  # the message is the point
                raise AssertionError(f"block {i} of {guide} failed: {err!r}\n{code}") from err
        return namespace

    return run


# The heavy tier: slow tests of the paper-scale paths (streamed two-process fits, the
# paper configs end to end, torchvision ResNet-34/50 against PyTorch, every bound
# relaxation by dense sampling, the shift driver's end-to-end grid). They are excluded
# from the default run (setup.cfg addopts: -m "not heavy") to keep the README test
# command inside its CI budget; run them with `pytest -m heavy`.
_HEAVY_FILES = ("tests/experiments/test_paper.py", "tests/reliability/test_multiprocess.py",
                "tests/models/test_torchvision.py", "tests/faithful/test_bounds_ops.py",
                "tests/experiments/test_shift.py")


def pytest_collection_modifyitems(config, items):
    root = str(config.rootpath)
    for item in items:
        rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        if rel in _HEAVY_FILES and item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.heavy)
