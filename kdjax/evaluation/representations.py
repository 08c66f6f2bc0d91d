r"""Evaluation of a frozen encoder's representation: probes and manifold preservation.

The protocol of unsupervised / self-supervised distillation (CoSS, arXiv 2409.13939,
Tables 1-2): embed every split once with the network frozen (:func:`kdjax.evaluation.embed`,
``features["pooled"]``), then

* :func:`probe_metrics`: top-1 of the weighted k-NN classifier
  (:func:`~kdjax.evaluation.knn_accuracy`, InstDisc / DINO) and of a linear probe
  (:func:`~kdjax.evaluation.linear_probe`, logistic regression on standardised
  features), both fit on the labelled ``bank`` split and scored on every other split;
* :func:`manifold_metrics`: how well a student's embedding keeps its teacher's --
  linear CKA (:func:`~kdjax.evaluation.linear_cka`) and the ``k``-NN overlap
  :math:`\frac{1}{N}\sum_i |\mathcal N_k^S(i) \cap \mathcal N_k^T(i)| / k`
  (:func:`~kdjax.evaluation.knn_overlap`) of the same examples;
* :func:`evaluate_encoder`: both, from a module and its variables.

Metric names are ``knn_<split>``, ``probe_<split>`` (plus ``probe_<bank>``, the probe's
training accuracy), ``cka_<split>`` and ``knn_overlap_<split>``, top-1 / CKA / overlap in
``[0, 1]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax.numpy as jnp

from kdjax.evaluation.predict import embed
from kdjax.evaluation.probes import knn_accuracy, linear_probe
from kdjax.evaluation.similarity import knn_overlap, linear_cka

__all__ = ["probe_metrics", "manifold_metrics", "evaluate_encoder"]


def probe_metrics(key: chex.PRNGKey, features: Mapping[str, Any], labels: Mapping[str, Any],
                  *, num_classes: int, bank: str = "train", knn_k: int = 10,
                  knn_temperature: float = 0.07, probe_steps: int = 500,
                  probe_learning_rate: float = 0.01,
                  probe_weight_decay: float = 1e-4) -> dict[str, float]:
    """k-NN and linear-probe top-1 of frozen features, fit on ``bank``, on every other split.

    ``features`` / ``labels`` map split names to ``[N, D]`` features and ``[N]`` labels;
    ``features[bank]`` (with its labels) is the k-NN memory bank and the probe's training
    set. The probe (``key``; :func:`~kdjax.evaluation.linear_probe` with ``probe_steps``,
    ``probe_learning_rate``, ``probe_weight_decay``) is fit once and scored on the first
    other split and, with the same head and standardisation, on the rest.

    Examples:
      >>> import jax, numpy as np
      >>> from kdjax.evaluation.representations import probe_metrics
      >>> x = np.array([[-2.0, 0.0], [-1.0, 1.0], [1.0, 0.0], [2.0, 1.0]], np.float32)
      >>> y = np.array([0, 0, 1, 1])
      >>> m = probe_metrics(jax.random.PRNGKey(0), {"train": x, "test": x},
      ...                   {"train": y, "test": y}, num_classes=2, knn_k=1, probe_steps=100)
      >>> sorted(m.items())
      [('knn_test', 1.0), ('probe_test', 1.0), ('probe_train', 1.0)]

    Returns:
      ``{"knn_<s>", "probe_<s>"}`` for each split ``s`` other than ``bank`` and
      ``"probe_<bank>"`` (the probe's training accuracy).
    """
    others = [s for s in features if s != bank]
    if bank not in features or not others:
        raise ValueError(f"features must hold the bank split {bank!r} and at least one "
                         f"other split, got {sorted(features)}.")
    bank_x, bank_y = features[bank], labels[bank]

    def knn(s):
        return knn_accuracy(bank_x, bank_y, features[s], labels[s], num_classes=num_classes,
                            k=knn_k, temperature=knn_temperature)

    first, rest = others[0], others[1:]
    probe = linear_probe(key, bank_x, bank_y, features[first], labels[first],
                         num_classes=num_classes, steps=probe_steps,
                         learning_rate=probe_learning_rate, weight_decay=probe_weight_decay)
    out = {f"knn_{first}": knn(first), f"probe_{first}": probe.accuracy,
           f"probe_{bank}": probe.train_accuracy}
    for s in rest:
        z = (jnp.asarray(features[s]) - probe.mean) / probe.std
        pred = jnp.argmax(z @ probe.weights + probe.bias, axis=1)
        out[f"knn_{s}"] = knn(s)
        out[f"probe_{s}"] = float(jnp.mean(pred == jnp.asarray(labels[s])))
    return out


def manifold_metrics(features: Mapping[str, Any], teacher_features: Mapping[str, Any], *,
                     k: int = 10, splits: Sequence[str] = ("test",)) -> dict[str, float]:
    """Linear CKA and ``k``-NN overlap of a student's and its teacher's embeddings.

    For each split ``s`` of ``splits``, ``features[s]`` and ``teacher_features[s]`` embed
    the same examples (row ``i`` = example ``i``). Returns ``{"cka_<s>",
    "knn_overlap_<s>"}`` (:func:`~kdjax.evaluation.linear_cka`,
    :func:`~kdjax.evaluation.knn_overlap` with Euclidean neighbours), each 1 when the
    student's embedding is a rotation and scaling of the teacher's.
    """
    out = {}
    for s in splits:
        out[f"cka_{s}"] = linear_cka(features[s], teacher_features[s])
        out[f"knn_overlap_{s}"] = knn_overlap(features[s], teacher_features[s], k)
    return out


def evaluate_encoder(module, variables, data: Mapping[str, tuple[Any, Any]], *,
                     key: chex.PRNGKey, num_classes: int, teacher_features=None,
                     manifold_splits: Sequence[str] = ("test",), bank: str = "train",
                     feature: str = "pooled", mesh=None, **probe_options):
    """:func:`probe_metrics` (and, given ``teacher_features``, :func:`manifold_metrics`
    with ``k = knn_k``) of a frozen network; ``(metrics, features)``.

    ``data`` maps split names to ``(x, y)``; every split is embedded once
    (:func:`~kdjax.evaluation.embed` of ``features[feature]``, eval mode, sharded over
    ``mesh``) and the embeddings are returned, e.g. a teacher's, to pass as the
    ``teacher_features`` of its students. ``probe_options`` are the keyword options of
    :func:`probe_metrics` (``knn_k``, ``knn_temperature``, ``probe_steps``, ...).
    """
    feats = {s: embed(module, variables, x, feature=feature, mesh=mesh)
             for s, (x, _) in data.items()}
    m = probe_metrics(key, feats, {s: y for s, (_, y) in data.items()},
                      num_classes=num_classes, bank=bank, **probe_options)
    if teacher_features is not None:
        m.update(manifold_metrics(feats, teacher_features, splits=manifold_splits,
                                  k=probe_options.get("knn_k", 10)))
    return m, feats
