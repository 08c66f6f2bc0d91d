"""Training engine: train state, distillation step, epochs on device, evaluation,
sharding, checkpoints, teacher caching and results."""

from kdjax.train.checkpoint import Checkpointer, load_pytree, save_pytree
from kdjax.train.compilation import count_compilations, enable_compilation_cache
from kdjax.train.engine import Distiller, TrainState, evaluate, method_keys, predict, replicate
from kdjax.train.loop import (DivergenceError, EvalSet, Evaluation, FitResult, fit,
                              num_seeds_of)
from kdjax.train.optim import make_optimizer
from kdjax.train.sharding import data_sharding, make_mesh, replicated, shard_batch

__all__ = ["Checkpointer", "Distiller", "DivergenceError", "EvalSet", "Evaluation",
           "FitResult", "TrainState", "count_compilations", "data_sharding",
           "enable_compilation_cache", "evaluate", "fit", "load_pytree", "make_mesh",
           "make_optimizer", "method_keys", "num_seeds_of", "predict", "replicate",
           "replicated", "save_pytree", "shard_batch"]
