"""Evaluation of trained networks: forward passes (one network or many seeds at once),
k-NN and linear probes, AUROC, embedding similarity (linear CKA, k-NN overlap) and feature distribution
distances; the frozen-encoder protocol of unsupervised distillation (probes on every split,
manifold preservation) in :mod:`kdjax.evaluation.representations`."""

from kdjax.evaluation.metrics import auroc
from kdjax.evaluation.predict import embed, embed_seeds, predict_seeds, stack_variables
from kdjax.evaluation.probes import (LinearProbeResult, knn_accuracy, knn_predict,
                                     linear_probe)
from kdjax.evaluation.representations import (evaluate_encoder, manifold_metrics,
                                              probe_metrics)
from kdjax.evaluation.similarity import feature_distances, knn_overlap, linear_cka

__all__ = ["auroc", "embed", "embed_seeds", "predict_seeds", "stack_variables",
           "LinearProbeResult", "knn_accuracy", "knn_predict", "linear_probe",
           "knn_overlap", "linear_cka", "feature_distances", "evaluate_encoder",
           "manifold_metrics", "probe_metrics"]
