"""Helpers shared by several method families (:mod:`kdjax.methods.zoo`,
:mod:`~kdjax.methods.shiftkd`, :mod:`~kdjax.methods.kd2m`, :mod:`~kdjax.methods.coss`,
:mod:`~kdjax.methods.robust`, :mod:`~kdjax.methods.faithful`): feature picking, pair
resolution, rng splitting, adapter-param checks and a step-counter ``init``.

Outputs are ``(logits, features)`` pairs as returned by :mod:`kdjax.models`
(``features`` a dict of named, channels-last arrays). Feature selection by ``pairs`` (a
list of ``[student_feature, teacher_feature]``): ``None`` picks defaults from the
outputs' feature dicts (see :func:`resolve_pairs`): ``"all"`` takes every feature name
present in both with a spatial rank (3 or 4) except ``"pooled"``; ``"last"`` the last
such name in sorted order (RepDistiller's ``feat[-2]``), falling back to ``"pooled"``;
``"pooled"`` is ``[["pooled", "pooled"]]``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = ["features", "pick", "resolve_pairs", "pair_features", "check_feature_pair",
           "split_rng", "check_params", "step_init"]


def features(out, who: str) -> Mapping[str, Any]:
    """The features dict of a ``(logits, features)`` output; ``who`` (``"student"`` or
    ``"teacher"``) names it in the error raised for anything else."""
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[1], Mapping):
        raise ValueError(f"{who}_out must be a (logits, features_dict) pair, got "
                         f"{type(out).__name__}.")
    return out[1]


def pick(out, name: str, who: str):
    """Feature ``name`` of output ``out``; an unknown name raises ``ValueError`` listing
    the available features (the option is ``pairs``)."""
    feats = features(out, who)
    if name not in feats:
        raise ValueError(f"unknown {who} feature {name!r} in 'pairs'; available {who} "
                         f"features: {sorted(feats)}.")
    return feats[name]


def resolve_pairs(pairs, student_out, teacher_out, default: str) -> list[tuple[str, str]]:
    """Validates ``pairs`` against the outputs' feature names, or picks the default.

    ``default`` is ``"all"``, ``"last"`` or ``"pooled"`` (see the module docstring).
    An unknown name raises ``ValueError`` listing the available feature names.
    """
    if pairs is None:
        fs, ft = features(student_out, "student"), features(teacher_out, "teacher")
        spatial = sorted(n for n in fs if n in ft and n != "pooled"
                         and jnp.ndim(fs[n]) in (3, 4) and jnp.ndim(ft[n]) in (3, 4))
        if default == "all" and spatial:
            return [(n, n) for n in spatial]
        if default == "last" and spatial:
            return [(spatial[-1], spatial[-1])]
        if default == "all":
            raise ValueError(
                "no common spatial features ([B, L, C] or [B, H, W, C]) in student and "
                f"teacher outputs: student has {sorted(fs)}, teacher has {sorted(ft)}; "
                "set 'pairs'.")
        pairs = [["pooled", "pooled"]]
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of [student_feature, "
                         f"teacher_feature], got {pairs!r}.")
    out = []
    for p in pairs:
        if isinstance(p, (str, bytes)) or len(p) != 2:
            raise ValueError(f"each entry of pairs must be [student_feature, "
                             f"teacher_feature], got {p!r}.")
        pick(student_out, p[0], "student")
        pick(teacher_out, p[1], "teacher")
        out.append((str(p[0]), str(p[1])))
    return out


def pair_features(pairs, student_out, teacher_out, default: str) -> Iterator[tuple]:
    """``(key, student_feature, stop_gradient(teacher_feature))`` for each resolved pair
    (:func:`resolve_pairs`), ``key = f"pair{k}"`` naming its adapter params."""
    for k, (sn, tn) in enumerate(resolve_pairs(pairs, student_out, teacher_out, default)):
        yield (f"pair{k}", pick(student_out, sn, "student"),
               jax.lax.stop_gradient(pick(teacher_out, tn, "teacher")))


def check_feature_pair(features_option) -> None:
    """Raises ``ValueError`` unless a ``features`` option is a
    ``[student_feature, teacher_feature]`` pair."""
    if not isinstance(features_option, (list, tuple)) or len(features_option) != 2:
        raise ValueError("features must be a [student_feature, teacher_feature] pair, "
                         f"got {features_option!r}.")


def split_rng(rng, n: int) -> list:
    """``n`` (at least one) keys split from ``rng``, as a list."""
    return list(jax.random.split(rng, max(n, 1)))


def check_params(params, key: str, method: str) -> None:
    """Raises ``ValueError`` naming ``method`` when its adapter params lack ``key``."""
    if key not in params:
        raise ValueError(f"{method}: adapter params for {key!r} missing (got keys "
                         f"{sorted(params)}); call init with the same 'pairs'.")


def step_init(rng, student_out, teacher_out, options):
    """A method ``init`` for terms that count their own steps: no adapter params, state
    ``{"step": 0}`` (an ``int32`` scalar the loss increments)."""
    return {}, {"step": jnp.zeros((), jnp.int32)}
