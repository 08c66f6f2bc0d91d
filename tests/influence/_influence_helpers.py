"""Shared helpers of the kdjax.influence tests (tests/influence is on sys.path)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


def mlp_init(key, d=4, h=5, c=3):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"w1": jax.random.normal(k1, (d, h)) / np.sqrt(d),
            "b1": 0.1 * jax.random.normal(k2, (h,)),
            "w2": jax.random.normal(k3, (h, c)) / np.sqrt(h),
            "b2": 0.1 * jax.random.normal(k4, (c,))}


def mlp_apply(params, batch):
    hid = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return hid @ params["w2"] + params["b2"]


def ce_out(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def mlp_loss(params, batch):
    return ce_out(mlp_apply(params, batch), batch)


def make_batch(key, n, d=4, c=3):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, d)), "y": jax.random.randint(ky, (n,), 0, c)}


def rel_err(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def flat(tree):
    return ravel_pytree(tree)[0]
