"""The benchmark suite's own arithmetic: FLOP counts against closed forms, and the
train-step builder's teacher modes (no timings are asserted anywhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks._common import cost_flops
from benchmarks.train_step import build


def test_cost_flops_matches_closed_forms():
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    x, k = jnp.ones((8, 40, 4)), jnp.ones((5, 4, 16))
    assert cost_flops(conv, x, k) == 2 * 8 * 40 * 16 * 5 * 4
    grouped = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=2))
    assert cost_flops(grouped, x, jnp.ones((5, 2, 16))) == 2 * 8 * 40 * 16 * 5 * 2
    mm = jax.jit(lambda a, b: a @ b)
    assert cost_flops(mm, jnp.ones((3, 4)), jnp.ones((4, 5))) == 2 * 3 * 4 * 5
    scanned = jax.jit(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=7)[0])
    assert cost_flops(scanned, jnp.ones((4, 4))) == 7 * 2 * 4**3
    # a gradient adds the two transposed products of a matmul
    g = jax.jit(jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1)))
    assert cost_flops(g, jnp.ones((3, 4)), jnp.ones((4, 5))) == 3 * (2 * 3 * 4 * 5)


def test_train_step_builder_teacher_modes_compute_the_same_step():
    """Precomputed teacher logits give the same loss as the teacher run in the step."""
    totals = {}
    for mode in ("step", "precomputed"):
        d, state, tvars, batch = build("digits_mlp", 8, teacher_mode=mode)
        assert ("teacher_logits" in batch) == (mode == "precomputed")
        assert (tvars is None) == (mode == "precomputed")
        _, terms = jax.jit(d.train_step)(state, tvars, batch, jax.random.PRNGKey(0))
        totals[mode] = float(terms["total"])
    np.testing.assert_allclose(totals["precomputed"], totals["step"], rtol=1e-6)
    with pytest.raises(ValueError, match="teacher_mode must be 'step' or 'precomputed'"):
        build("digits_mlp", 8, teacher_mode="cached")
