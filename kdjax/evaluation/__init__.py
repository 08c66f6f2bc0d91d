"""Evaluation of trained networks: forward passes (one network or many seeds at once),
k-NN and linear probes, AUROC, embedding similarity (linear CKA, k-NN overlap) and feature distribution
distances."""

from kdjax.evaluation.metrics import auroc
from kdjax.evaluation.predict import embed, embed_seeds, predict_seeds, stack_variables
from kdjax.evaluation.probes import (LinearProbeResult, knn_accuracy, knn_predict,
                                     linear_probe)
from kdjax.evaluation.similarity import feature_distances, knn_overlap, linear_cka

__all__ = ["auroc", "embed", "embed_seeds", "predict_seeds", "stack_variables",
           "LinearProbeResult", "knn_accuracy", "knn_predict", "linear_probe",
           "knn_overlap", "linear_cka", "feature_distances"]
