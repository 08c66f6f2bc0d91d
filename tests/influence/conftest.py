"""Shared fixture of the influence tests: a small MLP problem (params, batch, tangent)."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _influence_helpers import make_batch, mlp_init  # noqa: E402


@pytest.fixture(scope="module")
def mlp_problem():
    params = mlp_init(jax.random.key(0))
    batch = make_batch(jax.random.key(1), 16)
    v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    return params, batch, v
