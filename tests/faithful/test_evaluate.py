"""Tests of kdjax.faithful.evaluate: the per-point evaluator against the primitives it
combines, the report's arithmetic on hand-made values, point selection, flat columns,
the certification table and the bounds plot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import faithful as F
from kdjax.models import MLP

TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    x = jax.random.uniform(jax.random.key(0), (10, 6))
    mt, ms = MLP(3, hidden=(12,)), MLP(3, hidden=(6,))
    tv = mt.init(jax.random.key(1), x[:1])
    sv = ms.init(jax.random.key(2), x[:1])
    t_fn = lambda z: mt.apply(tv, z, train=False)[0]  # noqa: E731
    s_fn = lambda v, z: ms.apply(v, z, train=False)[0]  # noqa: E731
    return x, t_fn, s_fn, sv


def test_evaluator_values_are_the_primitives(pair):
    x, t_fn, s_fn, sv = pair
    clip, eps, key = (0.0, 1.0), 0.05, jax.random.key(7)
    ev = F.gap_evaluator(t_fn, s_fn, steps=4, restarts=2, crown_points=3, clip=clip)
    out = jax.device_get(ev(sv, x, jnp.float32(eps), key))
    sf = lambda z: s_fn(sv, z)  # noqa: E731
    pgd, _ = F.pgd_gap(t_fn, sf, x, eps=eps, steps=4, restarts=2, key=key, clip=clip)
    ibp = F.certify(t_fn, sf, x, eps=eps, delta=0.1, method="ibp", clip=clip)
    crown = F.certify(t_fn, sf, x[:3], eps=eps, delta=0.1, method="crown", clip=clip)
    np.testing.assert_allclose(out["pgd"], pgd, atol=1e-6)
    np.testing.assert_allclose(out["ibp"], ibp["gap_upper"], atol=1e-6)
    np.testing.assert_array_equal(out["agree_ibp"], ibp["agree"])
    np.testing.assert_allclose(out["crown"], crown["gap_upper"], atol=1e-6)
    np.testing.assert_array_equal(out["agree_crown"], crown["agree"])
    assert out["crown"].shape == (3,)
    assert np.all(out["pgd"] <= out["ibp"] + TOL)
    assert np.all(out["pgd"][:3] <= out["crown"] + TOL)
    # no CROWN keys without crown points; the student's variables are an argument
    ev0 = F.gap_evaluator(t_fn, s_fn, steps=2, clip=clip)
    other = jax.tree_util.tree_map(lambda a: 2.0 * a, sv)
    o1, o2 = ev0(sv, x, jnp.float32(eps), key), ev0(other, x, jnp.float32(eps), key)
    assert set(o1) == {"pgd", "ibp", "agree_ibp"}
    assert not np.allclose(o1["ibp"], o2["ibp"])


def test_report_combines_ibp_and_crown_like_certify(pair):
    x, t_fn, s_fn, sv = pair
    clip, eps, delta = (0.0, 1.0), (0.01, 0.05, 0.2), (0.05, 0.5)
    ev = F.gap_evaluator(t_fn, s_fn, steps=3, crown_points=4, clip=clip)
    rep = F.faithfulness_report(ev, sv, x, eps=eps, delta=delta, seed=3)
    assert list(rep["eps"]) == ["0.01", "0.05", "0.2"] and rep["bound_violations"] == 0
    sf = lambda z: s_fn(sv, z)  # noqa: E731
    for i, e in enumerate(eps):
        m = rep["eps"][str(e)]
        key = jax.random.fold_in(jax.random.PRNGKey(3), i)
        pgd, _ = F.pgd_gap(t_fn, sf, x, eps=e, steps=3, key=key, clip=clip)
        assert m["pgd_gap"] == pytest.approx(float(pgd.mean()), abs=1e-6)
        assert m["pgd_gap_crown_points"] == pytest.approx(float(pgd[:4].mean()), abs=1e-6)
        ibp = F.certify(t_fn, sf, x, eps=e, delta=0.0, method="ibp", clip=clip)
        cr = F.certify(t_fn, sf, x[:4], eps=e, delta=0.0, method="crown", clip=clip)
        upper = np.minimum(np.asarray(ibp["gap_upper"])[:4], cr["gap_upper"])
        agree = np.asarray(ibp["agree"])[:4] | np.asarray(cr["agree"])
        assert m["certified_points"] == 4
        assert m["certified_gap"] == pytest.approx(float(upper.mean()), abs=1e-6)
        assert m["certified_agree"] == pytest.approx(float(agree.mean()))
        for d in delta:
            assert m["certified_faithful"][str(d)] == pytest.approx(
                float(np.mean((upper <= d) & agree)))
            assert m["certified_faithful_ibp"][str(d)] == pytest.approx(
                float(np.mean((np.asarray(ibp["gap_upper"]) <= d) & ibp["agree"])))
        assert m["pgd_gap_crown_points"] <= m["certified_gap"] + TOL
        assert m["certified_gap"] <= m["ibp_gap_crown_points"] + TOL
    # IBP is inclusion-monotone: its bound grows with the radius
    ibps = [rep["eps"][str(e)]["ibp_gap"] for e in eps]
    assert all(a <= b + TOL for a, b in zip(ibps, ibps[1:]))


def test_identical_networks_are_certified_faithful_at_delta_zero(pair):
    x, t_fn, _, _ = pair
    ev = F.gap_evaluator(t_fn, lambda v, z: t_fn(z), steps=2, crown_points=2)
    m = F.faithfulness_report(ev, {}, x, eps=(0.02,), delta=(0.0,))["eps"]["0.02"]
    assert m["pgd_gap"] == pytest.approx(0.0, abs=1e-6)
    assert m["certified_gap"] == pytest.approx(0.0, abs=1e-6)
    assert m["certified_faithful"]["0.0"] == m["certified_agree"]


def test_report_arithmetic_on_hand_made_values():
    """Violations, the tighter bound, the OR of the agreement certificates and the
    fractions over the CROWN points, on values computed by hand."""
    def ev(v, x, eps, key):
        return {"pgd": np.array([0.3, 0.04, 0.05, 0.2]),
                "ibp": np.array([0.2, 0.4, 0.9, 0.1]),      # points 0 and 3: PGD above
                "agree_ibp": np.array([True, False, True, False]),
                "crown": np.array([0.25, 0.05]),            # point 0: PGD above
                "agree_crown": np.array([False, True])}

    rep = F.faithfulness_report(ev, None, None, eps=(0.1, 0.2), delta=(0.1, 0.3))
    assert rep["bound_violations"] == 2 * 3
    m = rep["eps"]["0.1"]
    # upper on the CROWN points: min(ibp, crown) = [0.2, 0.05]; agree = [True, True]
    assert m["certified_points"] == 2
    assert m["certified_gap"] == pytest.approx(0.125)
    assert m["certified_agree"] == 1.0
    assert m["certified_faithful"] == {"0.1": 0.5, "0.3": 1.0}
    assert m["certified_faithful_ibp"] == {"0.1": 0.0, "0.3": 0.25}
    assert m["pgd_gap"] == pytest.approx(0.1475) and m["ibp_gap"] == pytest.approx(0.4)
    assert m["crown_gap"] == pytest.approx(0.15)
    assert m["ibp_gap_crown_points"] == pytest.approx(0.3)
    assert m["pgd_gap_crown_points"] == pytest.approx(0.17)
    # without CROWN the fractions are over all points, with IBP
    ibp_only = lambda v, x, eps, key: {k: a for k, a in ev(v, x, eps, key).items()  # noqa
                                       if "crown" not in k}
    m = F.faithfulness_report(ibp_only, None, None, eps=(0.1,), delta=(0.3,))["eps"]["0.1"]
    assert m["certified_points"] == 4 and "crown_gap" not in m
    assert m["certified_faithful"] == {"0.3": 0.25} == m["certified_faithful_ibp"]
    with pytest.raises(ValueError, match="non-empty"):
        F.faithfulness_report(ev, None, None, eps=(), delta=(0.1,))


def test_report_at_and_flatten_report():
    rep = {"eps": {"0.1": {"pgd_gap": 0.1, "ibp_gap": 0.5, "certified_agree": 0.9,
                           "certified_gap": 0.3, "certified_faithful": {"0.2": 0.7}}},
           "bound_violations": 0}
    assert F.report_at(rep, 0.1, 0.2) == {"pgd_gap": 0.1, "ibp_gap": 0.5,
                                          "certified_agree": 0.9, "certified_faithful": 0.7}
    assert F.flatten_report(rep) == {
        "bound_violations": 0, "pgd_gap@eps=0.1": 0.1, "ibp_gap@eps=0.1": 0.5,
        "certified_agree@eps=0.1": 0.9, "certified_gap@eps=0.1": 0.3,
        "certified_faithful@eps=0.1, delta=0.2": 0.7}


def test_teacher_correct_points():
    logits = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    labels = np.array([0, 0, 2, 3, 0, 2])          # correct: 0, 2, 3, 4
    idx = F.teacher_correct_points(logits, labels, 3, seed=5)
    assert len(idx) == 3 and set(idx) <= {0, 2, 3, 4}
    np.testing.assert_array_equal(idx, F.teacher_correct_points(logits, labels, 3, seed=5))
    assert sorted(F.teacher_correct_points(logits, labels, 10)) == [0, 2, 3, 4]
    # the first points of one fixed shuffle: a smaller count is a prefix
    np.testing.assert_array_equal(F.teacher_correct_points(logits, labels, 2, seed=5),
                                  idx[:2])
    with pytest.raises(ValueError, match="labels"):
        F.teacher_correct_points(logits, labels[:3], 2)
    with pytest.raises(ValueError, match="num"):
        F.teacher_correct_points(logits, labels, 0)


def test_certified_agreement_and_errors(pair):
    lo = jnp.array([[0.0, 0.5, 0.1], [0.0, -0.1, 2.0], [0.3, 0.0, 0.0]])
    mb = F.MarginBounds(jnp.array([0, 0, 1]), lo, lo, lo, lo)
    assert F.certified_agreement(mb).tolist() == [True, False, False]
    with pytest.raises(TypeError, match="MarginBounds"):
        F.certified_agreement((lo, lo))
    x, t_fn, s_fn, _ = pair
    with pytest.raises(ValueError, match="crown_method"):
        F.gap_evaluator(t_fn, s_fn, crown_method="ibp")
    with pytest.raises(ValueError, match="crown_points"):
        F.gap_evaluator(t_fn, s_fn, crown_points=-1)
