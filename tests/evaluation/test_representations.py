"""kdjax.evaluation.representations: probes on every split of frozen features, manifold
preservation of a student's embedding, and both from a module."""

import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.evaluation import (embed, evaluate_encoder, knn_accuracy, knn_overlap, linear_cka,
                              linear_probe, manifold_metrics, probe_metrics)

OPTS = dict(knn_k=5, knn_temperature=0.1, probe_steps=50, probe_learning_rate=0.05,
            probe_weight_decay=1e-3)


def _blobs(seed, n, d=6, c=3, shift=0.0):
    centres = np.random.default_rng(99).normal(size=(c, d)) * 2.0
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n).astype(np.int32)
    return (centres[y] + rng.normal(size=(n, d)) + shift).astype(np.float32), y


def test_probe_metrics_are_knn_and_one_linear_probe_on_every_split():
    (xtr, ytr), (xte, yte), (xsh, ysh) = _blobs(0, 120), _blobs(1, 60), _blobs(2, 50, shift=1.0)
    key = jax.random.PRNGKey(3)
    m = probe_metrics(key, {"train": xtr, "test": xte, "shift": xsh},
                      {"train": ytr, "test": yte, "shift": ysh}, num_classes=3, **OPTS)
    assert list(m) == ["knn_test", "probe_test", "probe_train", "knn_shift", "probe_shift"]
    for name, x, y in (("test", xte, yte), ("shift", xsh, ysh)):
        assert m[f"knn_{name}"] == knn_accuracy(xtr, ytr, x, y, num_classes=3, k=5,
                                                temperature=0.1)
        # the same head (fit once on train) scores every split
        ref = linear_probe(key, xtr, ytr, x, y, num_classes=3, steps=50, learning_rate=0.05,
                           weight_decay=1e-3)
        assert m[f"probe_{name}"] == pytest.approx(ref.accuracy, abs=1e-6)
        assert m["probe_train"] == pytest.approx(ref.train_accuracy, abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in m.values()) and m["probe_test"] > 0.8


def test_probe_metrics_bank_name_and_errors():
    (xtr, ytr), (xte, yte) = _blobs(0, 60), _blobs(1, 30)
    m = probe_metrics(jax.random.PRNGKey(0), {"bank": xtr, "val": xte},
                      {"bank": ytr, "val": yte}, num_classes=3, bank="bank", **OPTS)
    assert set(m) == {"knn_val", "probe_val", "probe_bank"}
    with pytest.raises(ValueError, match="bank split 'train'"):
        probe_metrics(jax.random.PRNGKey(0), {"train": xtr}, {"train": ytr}, num_classes=3)
    with pytest.raises(ValueError, match="bank split 'train'"):
        probe_metrics(jax.random.PRNGKey(0), {"test": xte}, {"test": yte}, num_classes=3)


def test_manifold_metrics_of_a_rotated_copy_and_of_noise():
    x, _ = _blobs(0, 80)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
    m = manifold_metrics({"test": 3.0 * x @ q}, {"test": x}, k=5)
    assert m == {"cka_test": pytest.approx(1.0, abs=1e-6),
                 "knn_overlap_test": pytest.approx(1.0)}
    noise = np.random.default_rng(2).normal(size=(80, 4))
    m = manifold_metrics({"a": noise, "b": x}, {"a": x, "b": x}, k=5, splits=("a", "b"))
    assert m["cka_a"] == pytest.approx(linear_cka(noise, x))
    assert m["knn_overlap_a"] == pytest.approx(knn_overlap(noise, x, 5)) and m["cka_a"] < 0.5
    assert m["cka_b"] == pytest.approx(1.0)


def test_evaluate_encoder_embeds_every_split_once_and_adds_manifold_with_a_teacher():
    rng = np.random.default_rng(0)
    data = {s: (rng.normal(size=(n, 40, 1)).astype(np.float32),
                rng.integers(0, 3, size=n).astype(np.int32))
            for s, n in (("train", 64), ("test", 32))}
    net = models.create("cnn1d", 3, channels=(4,))
    variables = net.init(jax.random.PRNGKey(0), data["train"][0][:2], train=False)
    key = jax.random.PRNGKey(1)
    m, feats = evaluate_encoder(net, variables, data, key=key, num_classes=3, **OPTS)
    for s, (x, _) in data.items():
        np.testing.assert_array_equal(feats[s], embed(net, variables, x))
    ref = probe_metrics(key, feats, {s: y for s, (_, y) in data.items()}, num_classes=3,
                        **OPTS)
    assert m == ref
    other = net.init(jax.random.PRNGKey(5), data["train"][0][:2], train=False)
    m2, _ = evaluate_encoder(net, other, data, key=key, num_classes=3,
                             teacher_features=feats, **OPTS)
    _, f2 = evaluate_encoder(net, other, data, key=key, num_classes=3, **OPTS)
    assert m2["cka_test"] == pytest.approx(linear_cka(f2["test"], feats["test"]))
    assert m2["knn_overlap_test"] == pytest.approx(knn_overlap(f2["test"], feats["test"], 5))
    same, _ = evaluate_encoder(net, variables, data, key=key, num_classes=3,
                               teacher_features=feats, **OPTS)
    assert same["cka_test"] == pytest.approx(1.0) and same["knn_overlap_test"] == 1.0
