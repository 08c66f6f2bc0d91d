"""Compilation budget: cells that differ only in numbers reuse the compiled programs,
and a second process with the persistent cache compiles nothing new."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.train import (Distiller, EvalSet, Evaluation, count_compilations,
                         enable_compilation_cache, fit)

TX = optax.sgd(0.05, momentum=0.9)   # one optimiser object shared by the cells


def _data(n=96, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 12)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)}


def _cell(kd_weight, temperature, dkd_beta, seeds=(0, 1)):
    """A whole cell: init of the seeds, fit with evaluation, as a driver runs it."""
    student, teacher = models.create("mlp", 4, hidden=(16,)), models.create("mlp", 4)
    built = (methods.build({"name": "ce", "weight": 1.0 - kd_weight}),
             methods.build({"name": "kd", "weight": kd_weight, "temperature": temperature}),
             methods.build({"name": "dkd", "weight": 0.5, "beta": dkd_beta}))
    d = Distiller(student, built, TX, teacher=teacher)
    data = _data()
    import jax
    tvars = teacher.init(jax.random.PRNGKey(3), data["x"][:2])
    ev = Evaluation({"val": EvalSet(x=data["x"][:40], y=data["y"][:40])}, select_on="val")
    with count_compilations() as c:
        state = d.init_seeds(list(seeds), data["x"][:2], tvars)
        res = fit(d, state, tvars, data, epochs=2, batch_size=32, evaluation=ev,
                  progress=False)
    return c, res


def test_cells_differing_only_in_numbers_share_every_program():
    first, a = _cell(0.9, 4.0, 8.0)
    assert 3 <= first.count <= 4       # init, epoch, forward (+ metrics: first use)
    again, b = _cell(0.5, 2.0, 4.0)    # other weight, temperature and DKD beta
    assert again.count == 0
    # the numbers are really arguments: the results differ
    fa = np.concatenate([np.ravel(v) for v in
                         __import__("jax").tree_util.tree_leaves(a.state.params)])
    fb = np.concatenate([np.ravel(v) for v in
                         __import__("jax").tree_util.tree_leaves(b.state.params)])
    assert not np.allclose(fa, fb)
    # and a different structure (another method) does compile its init
    student, teacher = models.create("mlp", 4, hidden=(16,)), models.create("mlp", 4)
    other = Distiller(student, (methods.build({"name": "ce"}),), TX)
    with count_compilations() as c:
        state = other.init_seeds([0, 1], _data()["x"][:2])
    assert c.count == 1
    # but its forward pass (evaluation) is the same student's: shared, nothing compiles
    with count_compilations() as c:
        logits = other.predictor(512, num_seeds=2)(state, _data()["x"][:40])
    assert c.count == 0 and logits.shape == (2, 40, 4)
    d = Distiller(student, (methods.build({"name": "ce"}),), TX)
    np.testing.assert_allclose(logits[1], d.predict(   # vmapped vs one seed: rounding
        __import__("jax").tree_util.tree_map(lambda a: a[1], state), _data()["x"][:40]),
        rtol=1e-5, atol=1e-6)


def test_traced_numbers_give_the_numbers_of_constants():
    """A cell run with its numbers as arguments equals the same cell whose first run
    compiled them (independent of which cell compiled the program)."""
    _, ref = _cell(0.3, 3.0, 6.0, seeds=(5,))
    _cell(0.8, 5.0, 2.0, seeds=(5,))
    _, again = _cell(0.3, 3.0, 6.0, seeds=(5,))
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(ref.state.params),
                    jax.tree_util.tree_leaves(again.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_enable_compilation_cache_validates():
    with pytest.raises(ValueError, match="cache_dir must be a non-empty path, got ''"):
        enable_compilation_cache("")


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from kdjax.train import count_compilations, enable_compilation_cache
    enable_compilation_cache({cache!r})
    from test_compile import _cell
    c, res = _cell(0.9, 4.0, 8.0, seeds=({seed},))
    print(json.dumps({{"count": c.count, "hits": c.cache_hits}}))
""")


@pytest.mark.slow
def test_second_process_with_the_cache_compiles_nothing(tmp_path):
    """The same small training in a fresh process (other seed, other output) reads every
    training-path program from the persistent cache."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(tests))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = []
    for seed in (0, 1):
        script = SCRIPT.format(tests=tests, cache=str(tmp_path / "xla"), seed=seed)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        out.append(__import__("json").loads(p.stdout.strip().splitlines()[-1]))
    assert out[0]["count"] >= 3
    assert out[1]["count"] == 0 and out[1]["hits"] >= 3
