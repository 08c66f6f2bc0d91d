"""Pruning scores against explicit per-example computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import pruning as P


def _mlp(seed=0, d=5, h=4, c=3):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(size=(d, h)), jnp.float32),
            "b1": jnp.asarray(rng.normal(size=h), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(h, c)), jnp.float32)}


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def test_grand_equals_explicit_per_example_gradient_norms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    ps = [_mlp(0), _mlp(1)]
    got = P.grand_scores(_apply, ps, x, y, chunk=4)  # 7 = 4 + 3 (padded chunk)
    ref = np.zeros(7)
    for p in ps:
        for i in range(7):  # one example at a time: grad of its own loss
            g = jax.grad(lambda q: -jax.nn.log_softmax(_apply(q, x[i:i + 1]))[0, y[i]])(p)
            ref[i] += np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2))
                                  for v in jax.tree_util.tree_leaves(g)))
    np.testing.assert_allclose(got, ref / 2, rtol=1e-5)


def test_el2n_equals_the_error_vector_norm():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 6, 4))
    y = rng.integers(0, 4, 6)
    ref = np.zeros(6)
    for s in range(3):
        for i in range(6):
            p = np.exp(logits[s, i]) / np.exp(logits[s, i]).sum()
            e = np.zeros(4)
            e[y[i]] = 1
            ref[i] += np.sqrt(((p - e) ** 2).sum()) / 3
    np.testing.assert_allclose(P.el2n_scores(logits, y), ref, rtol=1e-10)
    np.testing.assert_allclose(P.el2n_scores(logits[0], y),
                               P.el2n_scores(logits[:1], y), rtol=1e-12)
    # a confident correct prediction scores ~0, a confident wrong one ~sqrt(2)
    sharp = np.array([[50.0, 0, 0], [0, 50.0, 0]])
    np.testing.assert_allclose(P.el2n_scores(sharp, np.array([0, 0])), [0, np.sqrt(2)],
                               atol=1e-9)


def test_keep_indices_highest_scores_per_class():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8])
    np.testing.assert_array_equal(P.keep_indices(s, 0.5), [1, 3, 5])
    labels = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(P.keep_indices(s, 0.5, labels), [1, 2, 3, 5])
    np.testing.assert_array_equal(P.keep_indices(np.zeros(4), 0.5), [0, 1])  # ties
    r = P.random_scores(1000, 0)
    assert len(P.keep_indices(r, 0.75)) == 750
    np.testing.assert_array_equal(r, P.random_scores(1000, 0))
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        P.keep_indices(s, 0.0)
