"""Every public loss of kdjax.losses under jit, grad, vmap, pmap and jax.shard_map.

One parametrised test over ALL losses (the module-level check below fails when a new
public name is neither a case nor a listed helper). Defaults only: shard_map runs with
its default ``check_vma=True``, on the 8 fake CPU devices of tests/conftest.py.
Each transform is checked against the untransformed loss:

* jit(f)(x) == f(x); grad is finite and not identically zero;
* vmap over 2 problems == the loop; pmap over 8 problems (one per device) == the loop;
* shard_map over a global batch of 8 shards with a pmean == mean of the per-shard
  losses (the per-device semantics, :func:`kdjax.losses.per_group`).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import losses as L

B = 4          # rows per problem / per device
C = 5          # classes
D = 6          # embedding size
_SINK = dict(max_iterations=200)  # keep the compiled Sinkhorn loops small


def _n(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _logits(k, b):
    k1, k2, k3 = jax.random.split(k, 3)
    return (_n(k1, (b, C)), _n(k2, (b, C)),
            jax.random.randint(k3, (b,), 0, C))


def _pair(shape_s, shape_t=None, shift=0.5):
    def make(k, b):
        k1, k2 = jax.random.split(k)
        return _n(k1, (b, *shape_s)), _n(k2, (b, *(shape_t or shape_s))) + shift
    return make


def _labelled_pair(k, b):
    k1, k2, k3 = jax.random.split(k, 3)
    # every class present in every shard: labels 0, 1, 0, 1, ...
    return _n(k1, (b, D)), _n(k2, (b, D)) + 0.5, jnp.arange(b) % 2


_CRD_QUEUE = L.init_crd_queue(jax.random.key(7), size=16, dim=D)
_SEED_QUEUE = L.seed_queue_init(jax.random.key(8), size=16, dim=D)[0]
_VID_SCALE = jnp.zeros((3,), jnp.float32)

# name -> (loss of the batch arrays, array maker(key, batch) -> tuple of [batch, ...])
CASES = {
    "kd": (lambda s, t, y: L.kd(s, t), _logits),
    "cross_entropy": (lambda s, t, y: L.cross_entropy(s, y), _logits),
    "dkd": (lambda s, t, y: L.dkd(s, t, y), _logits),
    "dist": (lambda s, t, y: L.dist(s, t), _logits),
    "mlkd": (lambda s, t, y: L.mlkd(s, t), _logits),
    "fitnet": (L.fitnet, _pair((4, 4, 3))),
    "attention_transfer": (L.attention_transfer, _pair((4, 4, 3), (4, 4, 5))),
    "nst": (L.nst, _pair((4, 4, 3), (4, 4, 5))),
    "fsp": (lambda a, b: L.fsp(a, a * 0.5 + 1.0, b, b * b), _pair((4, 4, 3))),
    "activation_boundary": (L.activation_boundary, _pair((4, 4, 3))),
    "factor_transfer": (L.factor_transfer, _pair((4, 4, 3))),
    "vid": (lambda s, t: L.vid(s, t, _VID_SCALE), _pair((4, 4, 3))),
    "hcl": (lambda s, t: L.hcl([s], [t]), _pair((4, 4, 3))),
    "similarity_preserving": (L.similarity_preserving, _pair((4, 4, 3), (4, 4, 5))),
    "correlation_congruence": (L.correlation_congruence, _pair((D,), (3,))),
    "rkd_distance": (L.rkd_distance, _pair((D,), (3,))),
    "rkd_angle": (L.rkd_angle, _pair((D,), (3,))),
    "rkd": (L.rkd, _pair((D,), (3,))),
    "pkt": (L.pkt, _pair((D,), (3,))),
    "crd": (L.crd, _pair((D,))),
    "crd_queue": (lambda s, t: L.crd_queue(s, t, _CRD_QUEUE)[0], _pair((D,))),
    "exact_ot": (L.exact_ot, _pair((D,))),
    "sinkhorn": (lambda x, y: L.sinkhorn(x, y, **_SINK), _pair((D,))),
    "sinkhorn_divergence": (lambda x, y: L.sinkhorn_divergence(x, y, **_SINK), _pair((D,))),
    "sliced_wasserstein": (lambda x, y: L.sliced_wasserstein(
        x, y, key=jax.random.key(0), num_projections=8), _pair((D,))),
    "gaussian_w2": (L.gaussian_w2, _pair((D,))),
    "gaussian_kl": (L.gaussian_kl, _pair((D,))),
    "mmd": (lambda x, y: L.mmd(x, y, kernel="rbf"), _pair((D,))),
    "joint_ot": (lambda x, y: L.joint_ot(x, y, x[:, :3], y[:, :3]), _pair((D,))),
    "gromov_wasserstein": (lambda x, y: L.gromov_wasserstein(
        x, y, epsilon=1e-2, max_iterations=5, inner_max_iterations=100), _pair((D,), (3,))),
    "conditional(sinkhorn)": (lambda x, y, lab: L.conditional(
        L.sinkhorn, x, y, lab, num_classes=2, **_SINK), _labelled_pair),
    "conditional(gaussian_w2)": (lambda x, y, lab: L.conditional(
        L.gaussian_w2, x, y, lab, num_classes=2), _labelled_pair),
    "coss": (L.coss, _pair((D,))),
    "space_similarity": (L.space_similarity, _pair((D,))),
    "cosine_distillation": (L.cosine_distillation, _pair((D,))),
    "disco": (L.disco, _pair((D,))),
    "seed": (lambda s, t: L.seed(s, t, _SEED_QUEUE), _pair((D,))),
}

# Public names that are not losses of a batch (helpers, wrappers, constants).
HELPERS = {"attention_map", "fsp_matrix", "match_spatial", "standardize_logits",
           "kl_to_teacher", "adaptive_avg_pool", "init_crd_queue", "seed_queue_init",
           "seed_queue_update", "per_device", "per_group", "conditional",
           "DIFFERENTIATION_MODES", "MMD_KERNELS", "EPSILON_SCALES", "MLKD_TEMPERATURES"}


def test_every_public_name_is_a_case_or_a_helper():
    covered = {name.split("(")[0] for name in CASES} | HELPERS
    assert sorted(set(L.__all__) - covered) == []
    assert sorted(HELPERS - set(L.__all__)) == []


def _arrays(name, n_problems, batch):
    keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), n_problems)
    per = [CASES[name][1](k, batch) for k in keys]
    return [jnp.stack(v) for v in zip(*per)]


def _close(a, b, tol=2e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_grad_vmap_pmap_shard_map(name, n_devices):
    f = CASES[name][0]
    # one problem: eager vs jit, grad finite and equal under jit
    args = [a[0] for a in _arrays(name, 1, B)]
    ref = f(*args)
    assert ref.shape == () and np.isfinite(float(ref))
    _close(jax.jit(f)(*args), ref)
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]

    def of_float(*fl):
        full = list(args)
        for i, v in zip(floats, fl):
            full[i] = v
        return f(*full)

    g = jax.grad(of_float)(*[args[i] for i in floats])
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)

    # vmap over 2 problems, pmap over one problem per device: equal to the loop
    many = _arrays(name, n_devices, B)
    loop = np.array([float(f(*[a[i] for a in many])) for i in range(n_devices)])
    _close(jax.vmap(f)(*[a[:2] for a in many]), loop[:2])
    _close(jax.pmap(f)(*many), loop)

    # shard_map (default check_vma=True): 8 shards of one global batch, pmean
    mesh = jax.make_mesh((n_devices,), ("data",))
    glob = [a.reshape(n_devices * B, *a.shape[2:]) for a in many]
    glob = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in glob]
    sm = jax.jit(jax.shard_map(lambda *a: jax.lax.pmean(f(*a), "data"), mesh=mesh,
                               in_specs=tuple(P("data") for _ in glob), out_specs=P()))
    _close(sm(*glob), loop.mean())


@pytest.mark.parametrize("name", ["sinkhorn", "conditional(sinkhorn)", "coss", "exact_ot"])
def test_per_device_equals_shard_map_and_per_group(name, n_devices):
    """The library wrapper (default check_vma) == the per-shard mean == per_group,
    with gradients."""
    f = CASES[name][0]
    many = _arrays(name, n_devices, B)
    loop = np.mean([float(f(*[a[i] for a in many])) for i in range(n_devices)])
    glob = [a.reshape(n_devices * B, *a.shape[2:]) for a in many]
    mesh = jax.make_mesh((n_devices,), ("data",))
    _close(L.per_device(f, mesh)(*glob), loop)
    _close(L.per_group(f, n_devices)(*glob), loop)
    g_dev = jax.grad(lambda x: L.per_device(f, mesh)(x, *glob[1:]))(glob[0])
    g_grp = jax.grad(lambda x: L.per_group(f, n_devices)(x, *glob[1:]))(glob[0])
    _close(g_dev, g_grp, tol=1e-3)
