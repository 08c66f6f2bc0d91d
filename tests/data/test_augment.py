"""Augmentations: shapes, determinism per key, invariants, jit == eager, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import augment, get_augmentation

KEY = jax.random.key(0)
IMAGES = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
SIGNALS = jax.random.normal(jax.random.key(2), (6, 40, 1))
LABELS = jnp.arange(6, dtype=jnp.int32)

X_ONLY = [
    (augment.random_crop, IMAGES), (augment.random_flip, IMAGES),
    (augment.random_shift, SIGNALS), (augment.gaussian_noise, SIGNALS),
    (augment.gaussian_noise, IMAGES), (augment.rand_augment, IMAGES),
    (augment.rand_augment, SIGNALS),
]


@pytest.mark.parametrize("fn, x", X_ONLY)
def test_shape_dtype_determinism_and_jit(fn, x):
    out = fn(KEY, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, fn(KEY, x))
    assert not np.array_equal(fn(jax.random.key(7), x), out)
    if fn is not augment.rand_augment:  # rand_augment under jit: test_vmap_over_keys
        np.testing.assert_allclose(jax.jit(fn)(KEY, x), out, atol=1e-5)


def test_flip_is_an_involution_and_random_flip_picks_per_example():
    np.testing.assert_array_equal(augment.flip_horizontal(augment.flip_horizontal(IMAGES)),
                                  IMAGES)
    out = augment.random_flip(KEY, IMAGES)
    flipped = augment.flip_horizontal(IMAGES)
    same = [np.array_equal(out[i], IMAGES[i]) for i in range(6)]
    flip = [np.array_equal(out[i], flipped[i]) for i in range(6)]
    assert all(a != b for a, b in zip(same, flip))
    np.testing.assert_array_equal(augment.random_flip(KEY, IMAGES, p=1.0), flipped)


def test_crop_is_a_window_of_the_zero_padded_image():
    np.testing.assert_array_equal(augment.random_crop(KEY, IMAGES, padding=0), IMAGES)
    out = np.asarray(augment.random_crop(KEY, IMAGES, padding=2))
    padded = np.pad(np.asarray(IMAGES), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(6):
        windows = [padded[i, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(np.array_equal(out[i], w) for w in windows)


def test_shift_is_zero_filled_translation():
    out = np.asarray(augment.random_shift(KEY, SIGNALS, max_shift=3))
    for i in range(6):
        ok = []
        for s in range(-3, 4):
            ref = np.zeros_like(SIGNALS[i])
            src = np.asarray(SIGNALS[i])
            if s >= 0:
                ref[s:] = src[:40 - s]
            else:
                ref[:s] = src[-s:]
            ok.append(np.array_equal(out[i], ref))
        assert any(ok)


def test_gaussian_noise_scale():
    big = jnp.zeros((64, 32, 32, 1))
    out = augment.gaussian_noise(KEY, big, std=0.5)
    np.testing.assert_allclose(float(out.std()), 0.5, rtol=0.02)


@pytest.mark.parametrize("fn, kw", [(augment.mixup, {"alpha": 0.4}),
                                    (augment.cutmix, {"alpha": 1.0})])
def test_mixing_returns_consistent_labels_and_lambda(fn, kw):
    jitted = jax.jit(lambda k: fn(k, IMAGES, LABELS, **kw))
    if fn is augment.mixup:
        np.testing.assert_allclose(jitted(KEY)[0], fn(KEY, IMAGES, LABELS, **kw)[0],
                                   atol=1e-5)
    for seed in range(4):
        x_mix, (y_a, y_b, lam) = jitted(jax.random.key(seed))
        lam = float(lam)
        assert 0.0 <= lam <= 1.0 and x_mix.shape == IMAGES.shape
        np.testing.assert_array_equal(y_a, LABELS)
        perm = np.asarray(y_b)  # labels are arange, so y_b is the permutation
        assert sorted(perm.tolist()) == list(range(6))
        other = np.asarray(IMAGES)[perm]
        if fn is augment.mixup:
            np.testing.assert_allclose(x_mix, lam * IMAGES + (1 - lam) * other, atol=1e-5)
        else:  # lam = fraction of pixels kept from x
            kept = np.all(np.asarray(x_mix) == np.asarray(IMAGES), axis=-1)[0]
            pasted = np.all(np.asarray(x_mix)[0] == other[0], axis=-1)
            if perm[0] != 0:
                assert np.all(kept | pasted)
                np.testing.assert_allclose(kept.mean(), lam, atol=1e-6)


def test_vmap_over_keys():
    keys = jax.random.split(KEY, 3)
    out = jax.jit(jax.vmap(lambda k: augment.rand_augment(k, IMAGES)))(keys)
    assert out.shape == (3,) + IMAGES.shape
    np.testing.assert_allclose(out[1], augment.rand_augment(keys[1], IMAGES), atol=1e-5)


def test_get_augmentation_on_batch_dicts():
    batch = {"x": IMAGES, "y": LABELS, "mask": jnp.ones(6)}
    out = get_augmentation("crop_flip", padding=2)(KEY, batch)
    assert set(out) == set(batch) and out["x"].shape == IMAGES.shape
    np.testing.assert_array_equal(out["mask"], batch["mask"])
    mixed = jax.jit(get_augmentation("mixup", alpha=0.2))(KEY, batch)
    assert {"y_b", "lam"} <= set(mixed)
    assert get_augmentation("none")(KEY, batch) is batch


def test_errors():
    with pytest.raises(ValueError, match=r"name must be one of .*mixup"):
        get_augmentation("autoaugment")
    with pytest.raises(TypeError, match="invalid options"):
        get_augmentation("flip", padding=3)
    with pytest.raises(ValueError, match="x must have rank 4"):
        augment.random_crop(KEY, SIGNALS)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        augment.random_flip(KEY, jnp.zeros((2, 4, 4, 1), jnp.int32))
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        augment.gaussian_noise(np.float32(0), SIGNALS)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        augment.mixup(KEY, IMAGES, LABELS, alpha=0.0)
    with pytest.raises(ValueError, match="magnitude must be in"):
        augment.rand_augment(KEY, IMAGES, magnitude=2.0)


def test_domain_mix_partners_come_from_other_domains():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax.data.augment import domain_mix, get_augmentation

    x = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
    y = jnp.arange(6)
    dom = jnp.array([0, 0, 1, 1, 2, 2])
    for seed in range(5):
        xm, (ya, yb, lam) = domain_mix(jax.random.PRNGKey(seed), x, y, dom, alpha=0.4)
        yb = np.asarray(yb)
        assert (np.asarray(dom)[yb] != np.asarray(dom)).all()  # partner: another domain
        np.testing.assert_allclose(xm, lam * x + (1 - lam) * x[yb], rtol=1e-6)
        np.testing.assert_array_equal(ya, y)
    # one domain only: partners drawn from the whole batch (no crash, valid indices)
    _, (_, yb, _) = domain_mix(jax.random.PRNGKey(0), x, y, jnp.zeros(6, int))
    assert set(np.asarray(yb)) <= set(range(6))
    aug = get_augmentation("domainmix", alpha=0.2)
    out = aug(jax.random.PRNGKey(1), {"x": x, "y": y, "domain": dom})
    assert {"y_b", "lam"} <= set(out)
    import pytest
    with pytest.raises(ValueError, match=r"needs batch\['domain'\]"):
        aug(jax.random.PRNGKey(1), {"x": x, "y": y})
