"""experiments/common.fit_seeds: vmapped and sequential seed training agree, and each
seed's checkpoint and history rows are its own."""

import os

import jax
import numpy as np
import optax

from experiments.common import fit_seeds
from kdjax import methods, models
from kdjax.train import Distiller, EvalSet, Evaluation


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def test_fit_seeds_vmapped_equals_sequential(tmp_path):
    r = np.random.default_rng(0)
    x = r.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    d = Distiller(models.create("mlp", 2, hidden=(8,)), (methods.build({"name": "ce"}),),
                  optax.sgd(0.1))
    kw = dict(epochs=2, batch_size=16, progress=False,
              evaluation=Evaluation({"val": EvalSet(x=x[:16], y=y[:16])}, select_on="val"))
    out = {}
    for vmap in (True, False):
        ckpt_dir = str(tmp_path / str(vmap))
        bests, history = fit_seeds(d, None, {"x": x, "y": y}, [3, 5], vmap=vmap,
                                   ckpt_dir=ckpt_dir, name="run", example_x=x[:2], **kw)
        assert len(bests) == 2 and {h["seed_index"] for h in history} == {0, 1}
        out[vmap] = [_flat(b["params"]) for b in bests]
        names = sorted(os.listdir(ckpt_dir))
        assert names == (["run_3_5"] if vmap else ["run_3", "run_5"])
    for a, b in zip(out[True], out[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[False][0], out[False][1])   # different seeds differ
