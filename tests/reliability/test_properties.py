"""Property-based tests (hypothesis): the invariants each loss family claims.

Shapes are fixed per property (so each jitted loss compiles once) and hypothesis draws
the values (through seeds and scales) and the permutations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdjax import losses as L

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.1, 10.0)


def _arr(seed, shape, scale=1.0, offset=0.0):
    return np.asarray(offset + scale * np.random.default_rng(seed).normal(size=shape),
                      np.float32)


LAB = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)

# name -> (jitted loss(s, t), student/teacher shape)
LOSSES = {
    "kd": (L.kd, (8, 4)),
    "dkd": (lambda s, t: L.dkd(s, t, LAB), (8, 4)),
    "dist": (L.dist, (8, 4)),
    "fitnet": (L.fitnet, (8, 5)),
    "attention_transfer": (L.attention_transfer, (8, 3, 3, 2)),
    "nst": (L.nst, (8, 3, 3, 2)),
    "similarity_preserving": (L.similarity_preserving, (8, 5)),
    "correlation_congruence": (L.correlation_congruence, (8, 5)),
    "rkd": (L.rkd, (8, 5)),
    "pkt": (L.pkt, (8, 5)),
    "mmd": (L.mmd, (8, 5)),
    "mmd_rbf": (functools.partial(L.mmd, kernel="rbf"), (8, 5)),
    "gaussian_w2": (L.gaussian_w2, (8, 5)),
    "exact_ot": (L.exact_ot, (8, 5)),
    "sliced_wasserstein": (functools.partial(L.sliced_wasserstein,
                                             key=jax.random.PRNGKey(3)), (8, 5)),
    "sinkhorn_divergence": (L.sinkhorn_divergence, (8, 5)),
}
JIT = {k: jax.jit(fn) for k, (fn, _) in LOSSES.items()}
SLOW = {"sinkhorn_divergence"}


def _names(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _val(name, s, t):
    return float(JIT[name](jnp.asarray(s), jnp.asarray(t)))


NONNEG = ["kd", "dkd", "dist", "fitnet", "attention_transfer", "nst",
          "similarity_preserving", "correlation_congruence", "rkd", "pkt", "mmd",
          "mmd_rbf", "gaussian_w2", "exact_ot", "sliced_wasserstein"]


@pytest.mark.parametrize("name", _names(NONNEG))
def test_non_negative(name):
    shape = LOSSES[name][1]

    @SETTINGS
    @given(seeds, seeds, scales)
    def prop(a, b, scale):
        assert _val(name, _arr(a, shape, scale), _arr(b, shape)) >= -1e-5

    prop()


ZERO_AT_EQUALITY = ["kd", "dkd", "dist", "fitnet", "attention_transfer", "nst",
                    "similarity_preserving", "correlation_congruence", "rkd", "pkt", "mmd",
                    "mmd_rbf", "gaussian_w2", "exact_ot", "sliced_wasserstein",
                    "sinkhorn_divergence"]


@pytest.mark.parametrize("name", _names(ZERO_AT_EQUALITY))
def test_zero_at_equality(name):
    shape = LOSSES[name][1]

    @SETTINGS
    @given(seeds, scales)
    def prop(a, scale):
        x = _arr(a, shape, scale)
        ref = max(1.0, _val(name, x, _arr(a + 1, shape, scale)))
        assert abs(_val(name, x, x)) <= 1e-4 * ref

    prop()


SYMMETRIC = ["mmd", "mmd_rbf", "gaussian_w2", "exact_ot", "sliced_wasserstein",
             "sinkhorn_divergence"]


@pytest.mark.parametrize("name", _names(SYMMETRIC))
def test_symmetric(name):
    shape = LOSSES[name][1]

    @SETTINGS
    @given(seeds, seeds, st.floats(-3.0, 3.0))
    def prop(a, b, shift):
        x, y = _arr(a, shape), _arr(b, shape, 2.0, shift)
        xy, yx = _val(name, x, y), _val(name, y, x)
        # Sinkhorn runs to a finite tolerance: symmetric up to it
        tol = 2e-2 if name == "sinkhorn_divergence" else 1e-4
        assert abs(xy - yx) <= tol * max(abs(xy), 1e-3) + 1e-5

    prop()


PERMUTATION = ["dist", "similarity_preserving", "correlation_congruence", "rkd", "pkt",
               "mmd", "mmd_rbf", "gaussian_w2", "exact_ot", "sliced_wasserstein",
               "sinkhorn_divergence", "kd", "fitnet"]


@pytest.mark.parametrize("name", _names(PERMUTATION))
def test_invariant_to_permuting_the_batch_of_both(name):
    shape = LOSSES[name][1]

    @SETTINGS
    @given(seeds, seeds, st.permutations(range(shape[0])))
    def prop(a, b, perm):
        perm = np.asarray(perm)
        s, t = _arr(a, shape), _arr(b, shape, 1.5, 0.5)
        if name == "dkd":
            return
        v, vp = _val(name, s, t), _val(name, s[perm], t[perm])
        tol = 2e-2 if name == "sinkhorn_divergence" else 1e-4
        assert abs(v - vp) <= tol * max(abs(v), 1e-3) + 1e-6

    prop()


CLOUD = ["mmd", "gaussian_w2", "exact_ot", "sliced_wasserstein"]


@pytest.mark.parametrize("name", CLOUD)
def test_distribution_distances_ignore_the_pairing(name):
    # distances between point clouds: permuting only one side changes nothing
    shape = LOSSES[name][1]

    @SETTINGS
    @given(seeds, seeds, st.permutations(range(shape[0])))
    def prop(a, b, perm):
        s, t = _arr(a, shape), _arr(b, shape, 1.5, 0.5)
        v, vp = _val(name, s, t), _val(name, s, t[np.asarray(perm)])
        assert abs(v - vp) <= 1e-4 * max(abs(v), 1e-3) + 1e-6

    prop()


def test_pairwise_losses_do_depend_on_the_pairing():
    # the permutation test above could not fail if the losses ignored the pairing;
    # the relation losses do not: permuting one side changes them
    s, t = _arr(0, (8, 5)), _arr(1, (8, 5))
    perm = np.roll(np.arange(8), 1)
    for name in ["similarity_preserving", "rkd", "pkt", "fitnet", "kd"]:
        shape = LOSSES[name][1]
        s, t = _arr(0, shape), _arr(1, shape)
        assert abs(_val(name, s, t) - _val(name, s, t[perm])) > 1e-4, name


@SETTINGS
@given(seeds, seeds, st.floats(-50.0, 50.0), st.floats(-50.0, 50.0))
def test_kd_invariant_to_adding_a_constant_to_logits(a, b, cs, ct):
    s, t = _arr(a, (8, 4), 3.0), _arr(b, (8, 4), 3.0)
    row = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]   # a different shift per row
    v = _val("kd", s, t)
    v2 = _val("kd", s + cs + 5 * row, t + ct - 7 * row)
    assert abs(v - v2) <= 1e-4 * max(v, 1e-2)


@SETTINGS
@given(seeds, seeds, st.floats(0.05, 20.0))
def test_dkd_and_dist_invariant_to_adding_a_constant_to_logits(a, b, c):
    s, t = _arr(a, (8, 4), 2.0), _arr(b, (8, 4), 2.0)
    for name in ["dkd", "dist"]:
        v, v2 = _val(name, s, t), _val(name, s + c, t - c)
        assert abs(v - v2) <= 1e-4 * max(v, 1e-2) + 1e-5, name


@SETTINGS
@given(seeds, seeds, scales, scales)
def test_sp_at_pkt_rkd_invariant_to_positive_scaling(a, b, cs, ct):
    # SP normalises the Gram rows, AT normalises the attention map, PKT uses cosines,
    # RKD normalises distances by their mean (angles are scale-free)
    for name in ["similarity_preserving", "attention_transfer", "pkt", "rkd"]:
        shape = LOSSES[name][1]
        s, t = _arr(a, shape), _arr(b, shape)
        v, v2 = _val(name, s, t), _val(name, cs * s, ct * t)
        assert abs(v - v2) <= 1e-3 * max(v, 1e-3), name


@SETTINGS
@given(seeds, seeds, scales)
def test_pkt_invariant_to_per_example_positive_scaling(a, b, c):
    s, t = _arr(a, (8, 5)), _arr(b, (8, 5))
    d = np.linspace(0.5, 4.0, 8, dtype=np.float32)[:, None] * c
    v, v2 = _val("pkt", s, t), _val("pkt", d * s, t)
    assert abs(v - v2) <= 1e-3 * max(v, 1e-3)


@SETTINGS
@given(seeds, seeds, scales)
def test_fitnet_and_mmd_scale_quadratically(a, b, c):
    # the homogeneous losses: L(c s, c t) = c^2 L(s, t)
    for name in ["fitnet", "mmd", "gaussian_w2", "exact_ot"]:
        shape = LOSSES[name][1]
        s, t = _arr(a, shape), _arr(b, shape)
        v, v2 = _val(name, s, t), _val(name, c * s, c * t)
        np.testing.assert_allclose(v2, c * c * v, rtol=2e-3, atol=1e-6, err_msg=name)


@SETTINGS
@given(seeds, seeds, st.floats(-10.0, 10.0))
def test_distribution_distances_invariant_to_a_common_translation(a, b, shift):
    for name in ["mmd", "gaussian_w2", "exact_ot"]:
        shape = LOSSES[name][1]
        s, t = _arr(a, shape), _arr(b, shape, 1.0, 1.0)
        v, v2 = _val(name, s, t), _val(name, s + shift, t + shift)
        assert abs(v - v2) <= 1e-3 * max(v, 1e-2), name
