"""Shift constructions: environments, label noise, domains, rotations, disjointness."""

import numpy as np
import pytest

from kdjax.data import list_shifts, make_shift, shift_domains
from kdjax.data.shifts import add_bump, colour_images, rotate_images

SPLITS = ("train", "val", "test_in", "test_target")


@pytest.fixture(scope="session")
def coloured(data_dir):
    # 16 replicas: ~11.5k examples per training environment (train + val), 5.8k at test,
    # so the 2% tolerances below are >= 5 standard deviations of the estimates.
    return make_shift("coloured_digits", data_dir=data_dir, seed=0, replicas=16,
                      recipe="domainbed")


@pytest.fixture(scope="session")
def coloured_multi(data_dir):
    # 10 replicas: ~7.2k examples per training environment, 3.6k at test: the 2%
    # tolerances are >= 4.5 standard deviations of the estimates (p = 0.95 / 0.85).
    return make_shift("coloured_digits", data_dir=data_dir, seed=0, replicas=10)


@pytest.fixture(scope="session")
def rotated(data_dir):
    return make_shift("rotated_digits", data_dir=data_dir, seed=0)


@pytest.fixture(scope="session")
def mnist1d_domains(data_dir):
    return make_shift("mnist1d_domains", data_dir=data_dir, target="scale",
                      num_train=400, num_test=100)


def _raw(ds):
    """Undo the recorded normalisation."""
    return ds.x * np.asarray(ds.info["std"], np.float32) + np.asarray(ds.info["mean"],
                                                                      np.float32)


def _agreement(ds, env):
    sel = ds.extras["env"] == env
    return (ds.extras["color"][sel] == ds.y[sel]).mean()


def test_list_and_errors():
    assert {"mnist1d_domains", "rotated_digits", "coloured_digits", "spurious_mnist1d",
            "rotated_mnist", "coloured_mnist", "mnist_corrupted", "cifar10_corrupted",
            "celeb_a_blond"} <= set(list_shifts())
    with pytest.raises(ValueError, match=r"name must be one of .*rotated_digits"):
        make_shift("rotated_cifar")
    with pytest.raises(ValueError, match=r"target .* must be one of .*'60'.*got '90'"):
        make_shift("rotated_digits", target="90")
    with pytest.raises(ValueError, match=r"domains entry must be one of .*shear"):
        make_shift("mnist1d_domains", domains=["clean", "wobbly"])
    with pytest.raises(ValueError, match=r"recipe .* must be one of .*domainbed"):
        make_shift("coloured_digits", recipe="irm")
    with pytest.raises(TypeError, match="invalid option for shift 'rotated_digits'"):
        make_shift("rotated_digits", replicas=3)


def test_coloured_environments_follow_the_recipe(coloured):
    pool = {k: coloured[k] for k in ("train", "val")}
    for env, p in ((0, 0.9), (1, 0.8)):
        y = np.concatenate([d.y[d.extras["env"] == env] for d in pool.values()])
        c = np.concatenate([d.extras["color"][d.extras["env"] == env]
                            for d in pool.values()])
        assert len(y) > 10_000
        assert abs((c == y).mean() - p) < 0.02
        assert abs(_agreement(coloured["test_in"], env) - p) < 0.02
    target = coloured["test_target"]
    assert set(target.extras["env"]) == {2}
    assert abs(_agreement(target, 2) - 0.1) < 0.02
    everything = [coloured[s] for s in SPLITS]
    noisy = np.concatenate([d.y != d.extras["label_clean"] for d in everything])
    assert abs(noisy.mean() - 0.25) < 0.02
    for d in everything:
        np.testing.assert_array_equal(d.extras["label_clean"], d.extras["digit"] >= 5)
        np.testing.assert_array_equal(d.extras["group"], 2 * d.y + d.extras["color"])
        assert d.x.shape[1:] == (8, 8, 2) and d.num_classes == 2
    # the colour channel holds the digit, the other channel is empty
    raw = _raw(coloured["train"])
    col = coloured["train"].extras["color"]
    n = np.arange(len(col))
    assert np.abs(raw[n, :, :, 1 - col]).max() < 1e-5
    assert (raw[n, :, :, col].reshape(len(col), -1).max(1) > 0.2).all()


def test_coloured_splits_disjoint_and_val_is_20_percent(coloured):
    base = {s: set(coloured[s].extras["base_index"]) for s in SPLITS}
    assert not base["train"] & base["val"]
    assert not base["train"] & base["test_target"] and not base["val"] & base["test_in"]
    for env in (0, 1):
        n_val = (coloured["val"].extras["env"] == env).sum()
        n_tr = (coloured["train"].extras["env"] == env).sum()
        assert abs(n_val / (n_val + n_tr) - 0.2) < 0.01


def test_shifts_are_deterministic_in_the_seed(data_dir, coloured):
    again = make_shift("coloured_digits", data_dir=data_dir, seed=0, replicas=16,
                       recipe="domainbed")
    other = make_shift("coloured_digits", data_dir=data_dir, seed=1, replicas=16,
                       recipe="domainbed")
    for s in SPLITS:
        np.testing.assert_array_equal(again[s].x, coloured[s].x)
        np.testing.assert_array_equal(again[s].y, coloured[s].y)
    assert not np.array_equal(other["train"].y, coloured["train"].y)


def test_rotated_digits_domains(rotated, data_dir):
    assert shift_domains("rotated_digits") == ("0", "15", "30", "45", "60", "75")
    info = rotated["train"].info
    assert info["target"] == "75" and info["angles"] == [0, 15, 30, 45, 60, 75]
    assert set(rotated["test_target"].extras["angle"]) == {75.0}
    assert 75.0 not in set(rotated["train"].extras["angle"])
    assert set(rotated["train"].extras["domain"]) == {0, 1, 2, 3, 4}
    # train/val split of base images, every training domain 20% val
    for d in range(5):
        n_val = (rotated["val"].extras["domain"] == d).sum()
        n_tr = (rotated["train"].extras["domain"] == d).sum()
        assert n_val == int(np.ceil(0.2 * (n_val + n_tr)))
    base = {s: set(rotated[s].extras["base_index"]) for s in SPLITS}
    assert not base["train"] & base["val"] and not base["train"] & base["test_target"]
    assert not base["val"] & base["test_target"]
    # the target domain is the test digits rotated by 75 degrees
    from kdjax.data import load
    test = load("digits", "test", data_dir=data_dir, normalize=False)
    tgt = rotated["test_target"]
    order = np.argsort(tgt.extras["base_index"])
    np.testing.assert_allclose(_raw(tgt)[order], rotate_images(test.x, 75), atol=1e-5)


def test_rotating_back_recovers_the_image():
    t = np.arange(24) - 11.5
    blob = np.exp(-(t[:, None] ** 2 + (t[None, :] / 0.5) ** 2) / 80.0)  # anisotropic, smooth
    x = blob[None, :, :, None].astype(np.float32)
    for angle in (15, 30, 45, 60, 75):
        rot = rotate_images(x, angle)
        assert np.abs(rot - x).max() > 0.1  # it did rotate
        back = rotate_images(rot, -angle)
        np.testing.assert_allclose(back[0, 4:-4, 4:-4], x[0, 4:-4, 4:-4], atol=0.05)
    np.testing.assert_array_equal(rotate_images(x, 0), x)


def test_mnist1d_domains_leave_one_out(mnist1d_domains):
    info = mnist1d_domains["train"].info
    assert len(info["domains"]) >= 4 and info["target"] == "scale"
    t = info["domains"].index("scale")
    assert set(mnist1d_domains["test_target"].extras["domain"]) == {t}
    for s in ("train", "val", "test_in"):
        assert t not in set(mnist1d_domains[s].extras["domain"])
    params = [info["params"][d] for d in info["domains"]]
    assert all(params[i] != params[j] for i in range(len(params))
               for j in range(i + 1, len(params)))
    for d in range(len(info["domains"])):
        if d == t:
            continue
        n_val = (mnist1d_domains["val"].extras["domain"] == d).sum()
        assert n_val == 80 and (mnist1d_domains["train"].extras["domain"] == d).sum() == 320
    tr = mnist1d_domains["train"]
    np.testing.assert_allclose(tr.x.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(mnist1d_domains["test_target"].info["mean"], info["mean"])


def test_spurious_mnist1d_binary(data_dir):
    s = make_shift("spurious_mnist1d", data_dir=data_dir, num_train=2000, num_test=500,
                   recipe="domainbed")
    tr = s["train"]
    assert tr.x.shape[1:] == (40, 1) and tr.num_classes == 2
    # n ~ 800 per environment: 4 standard deviations of a proportion near 0.85 ~ 0.05
    for env, p in ((0, 0.9), (1, 0.8)):
        sel = tr.extras["env"] == env
        assert abs((tr.extras["spurious"][sel] == tr.y[sel]).mean() - p) < 0.05
    tgt = s["test_target"]
    assert abs((tgt.extras["spurious"] == tgt.y).mean() - 0.1) < 0.06
    np.testing.assert_array_equal(tr.extras["group"], 2 * tr.y + tr.extras["spurious"])
    x = np.zeros((2, 40, 1), np.float32)
    bumped = add_bump(x, np.array([1, 0]), amplitude=2.0, center=35, width=1.5)
    assert bumped[0, 35, 0] == pytest.approx(2.0) and bumped[1, 35, 0] == pytest.approx(-2.0)
    assert abs(bumped[0, 10, 0]) < 1e-6


def test_colour_images():
    x = np.ones((3, 2, 2, 1), np.float32)
    out = colour_images(x, np.array([0, 1, 0]))
    np.testing.assert_array_equal(out[:, 0, 0], [[1, 0], [0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"x must have shape \[N, H, W, 1\]"):
        colour_images(np.ones((3, 2, 2, 3)), np.zeros(3))


def test_multiclass_coloured_agreement_and_noise_follow_the_config(coloured_multi):
    """P(attribute = label) per environment and the label-noise rate within 2% of the
    configuration (MULTICLASS_RECIPE), 10 classes, groups aligned/conflicting."""
    from kdjax.data.shifts import MULTICLASS_RECIPE as R

    pool = [coloured_multi[k] for k in ("train", "val")]
    for env, p in enumerate(R["env_probs"]):
        y = np.concatenate([d.y[d.extras["env"] == env] for d in pool])
        a = np.concatenate([d.extras["spurious"][d.extras["env"] == env] for d in pool])
        assert len(y) > 5_000
        assert abs((a == y).mean() - p) < 0.02
        assert abs(_agreement(coloured_multi["test_in"], env) - p) < 0.02
        # disagreeing attributes are spread over the other classes (not one fixed one)
        off = (a - y)[a != y] % 10
        assert set(off) == set(range(1, 10))
    target = coloured_multi["test_target"]
    assert abs(_agreement(target, len(R["env_probs"])) - R["test_prob"]) < 0.02
    everything = [coloured_multi[s] for s in SPLITS]
    noisy = np.concatenate([d.y != d.extras["label_clean"] for d in everything])
    assert abs(noisy.mean() - R["label_noise"]) < 0.02
    for d in everything:
        assert d.num_classes == 10 and d.x.shape[1:] == (8, 8, 3)
        np.testing.assert_array_equal(d.extras["label_clean"], d.extras["digit"])
        np.testing.assert_array_equal(
            d.extras["group"], 2 * d.y + (d.extras["spurious"] != d.y))
    info = target.info
    assert info["spurious_only_accuracy"] == R["test_prob"]
    assert info["shape_only_accuracy"] == pytest.approx(1 - R["label_noise"])
    # the pixels carry the attribute's palette colour: rgb / max(rgb) = palette[a]
    from kdjax.data.shifts import colour_palette
    raw = _raw(coloured_multi["train"])[:200]
    a = coloured_multi["train"].extras["spurious"][:200]
    flat = raw.reshape(len(raw), -1, 3)
    bright = flat[np.arange(len(raw)), flat.sum(-1).argmax(1)]
    np.testing.assert_allclose(bright / bright.max(-1, keepdims=True),
                               colour_palette(10)[a], atol=1e-4)


def test_multiclass_spurious_mnist1d_agreement_and_code(data_dir):
    from kdjax.data.shifts import add_code, spurious_codes

    s = make_shift("spurious_mnist1d", data_dir=data_dir, num_train=4000, num_test=1000,
                   replicas=3, env_probs=(0.9, 0.7), test_prob=0.0, label_noise=0.1)
    pool = [s[k] for k in ("train", "val")]
    for env, p in enumerate((0.9, 0.7)):
        y = np.concatenate([d.y[d.extras["env"] == env] for d in pool])
        a = np.concatenate([d.extras["spurious"][d.extras["env"] == env] for d in pool])
        assert len(y) == 6000 and abs((a == y).mean() - p) < 0.02
    tgt = s["test_target"]
    assert (tgt.extras["spurious"] != tgt.y).all()  # test_prob 0: always conflicting
    noisy = np.concatenate([s[k].y != s[k].extras["label_clean"] for k in SPLITS])
    assert abs(noisy.mean() - 0.1) < 0.02
    assert s["train"].num_classes == 10
    codes = spurious_codes(10, 8)
    assert len({tuple(c) for c in codes}) == 10 and set(np.unique(codes)) == {-1.0, 1.0}
    x = np.zeros((2, 40, 1), np.float32)
    out = add_code(x, np.array([3, 7]), codes, amplitude=0.5, start=30)
    np.testing.assert_array_equal(out[0, 30:38, 0], 0.5 * codes[3])
    np.testing.assert_array_equal(out[1, 30:38, 0], 0.5 * codes[7])
    assert not out[:, :30].any() and not out[:, 38:].any()
    with pytest.raises(ValueError, match="start must be in"):
        add_code(x, np.array([0, 1]), codes, amplitude=1.0, start=35)
