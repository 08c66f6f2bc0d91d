"""Seed-vmapped prediction and embedding equal one network at a time; embed equals a
direct apply."""

import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.evaluation import embed, embed_seeds, predict_seeds, stack_variables


@pytest.fixture(scope="module")
def nets():
    module = models.create("mlp", 3, hidden=(8,))
    x = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32)
    variables = [module.init(jax.random.PRNGKey(s), x[:2], train=False) for s in range(3)]
    return module, variables, x


def test_predict_and_embed_seeds_equal_one_network_at_a_time(nets):
    module, variables, x = nets
    stacked = stack_variables(variables)
    logits = predict_seeds(module, stacked, x, chunk=16)       # 37 = 2 full + 1 padded
    feats = embed_seeds(module, stacked, x, chunk=16)
    assert logits.shape == (3, 37, 3) and logits.dtype == np.float32
    for s, v in enumerate(variables):
        out, f = module.apply(v, x, train=False)
        np.testing.assert_allclose(logits[s], out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feats[s], f["pooled"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(embed(module, v, x, batch_size=8), f["pooled"],
                                   rtol=1e-5, atol=1e-6)


def test_errors(nets):
    module, variables, x = nets
    with pytest.raises(ValueError, match="feature 'nope'.*valid"):
        embed_seeds(module, stack_variables(variables), x, feature="nope")
    with pytest.raises(ValueError, match="feature 'nope'.*valid"):
        embed(module, variables[0], x, feature="nope")
    with pytest.raises(ValueError, match="chunk"):
        predict_seeds(module, stack_variables(variables), x, chunk=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        predict_seeds(module, stack_variables(variables), x[:0])
    with pytest.raises(ValueError, match="at least one"):
        stack_variables([])
