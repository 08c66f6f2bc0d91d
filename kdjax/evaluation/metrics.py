"""Ranking metrics of scores against binary labels."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc"]


def auroc(scores, positive, *, if_undefined: float | None = None) -> float:
    r"""Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counted 1/2 (the Mann-Whitney U statistic over ``P N``):

    .. math:: \mathrm{AUROC} = \frac{1}{PN} \sum_{i \in +} \sum_{j \in -}
              \big(\mathbb{1}[s_i > s_j] + \tfrac12 \mathbb{1}[s_i = s_j]\big)
              = \frac{R_+ - P(P+1)/2}{PN},

    with :math:`R_+` the sum of the mid-ranks of the positives (Hanley & McNeil 1982;
    equals ``sklearn.metrics.roc_auc_score(positive, scores)``). KD-AIF reports it with
    the sample weights as scores and "clean point" as positive: how well the weights
    rank clean points above corrupted ones.

    Args:
      scores: ``[N]`` finite scores (higher = more positive).
      positive: ``[N]`` booleans (or 0/1).
      if_undefined: returned when a class is empty (``None``: a ``ValueError``).
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    p = np.asarray(positive)
    if s.ndim != 1 or p.shape != s.shape:
        raise ValueError(f"scores and positive must be 1-D of one length, got shapes "
                         f"{s.shape} and {p.shape}.")
    if p.dtype != bool:
        if not np.isin(p, (0, 1)).all():
            raise ValueError("positive must be booleans or 0/1, got values "
                             f"{np.unique(p)[:5].tolist()}.")
        p = p.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite, got {int((~np.isfinite(s)).sum())} "
                         "non-finite values.")
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        if if_undefined is not None:
            return float(if_undefined)
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} "
                         "negative examples.")
    ranks = rankdata(s)                       # mid-ranks: ties count 1/2
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
