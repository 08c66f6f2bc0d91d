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
