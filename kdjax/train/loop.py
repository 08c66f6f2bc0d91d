"""``fit``: epochs on device, evaluation, model selection and checkpoint/resume.

A run is killed-safe: the state (incl. the epoch counter, optimiser state, the best
model so far and the metric history) is checkpointed every ``checkpoint_every`` epochs;
a restarted ``fit`` with the same checkpointer resumes from the newest readable
checkpoint and, since epoch keys are ``fold_in(seed_key, epoch)``, ends with exactly
the parameters of an uninterrupted run.

Several seeds train together when the state has a leading seed axis
(``jax.vmap(distiller.init)``); ``fit`` reads the number of seeds from it and runs them
as one vmapped program or one after the other, as :meth:`Distiller.resolve_seed_mode`
says (``Distiller.seed_mode``). One seed or
many, ``fit`` returns one :class:`FitResult` whose ``best`` has one record per seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from kdjax.data.stream import Stream
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.distributed import stream_epoch_runner
from kdjax.train.engine import NONFINITE, Distiller, TrainState, evaluate, replicate

__all__ = ["DivergenceError", "EvalSet", "Evaluation", "FitResult", "fit", "num_seeds_of"]


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or non-finite parameters (a diverged run)."""


class EvalSet(dict):
    """``EvalSet(x=..., y=..., teacher_logits=None, groups=None, num_groups=0)``."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`fit` evaluates, how often, and which epoch it keeps.

    Attributes:
      sets: named evaluation sets (:class:`EvalSet`), evaluated every ``every`` epochs
        and after the last one; ``FitResult.history`` holds one row per evaluation and
        seed.
      every: epochs between evaluations.
      select_on: name of the set used for model selection (e.g. ``"val"``): ``best`` is
        the epoch with the highest ``metric`` there. ``None``: the last epoch. Never
        select on a test split.
      metric: the metric of ``select_on`` that is maximised.
      batch_size: batch size of the evaluation's forward passes (padding rows are
        masked, so it changes speed and memory, not the metrics).
    """

    sets: Mapping[str, EvalSet] = dataclasses.field(default_factory=dict)
    every: int = 1
    select_on: str | None = None
    metric: str = "accuracy"
    batch_size: int = 512

    def __post_init__(self):
        if self.select_on is not None and self.select_on not in self.sets:
            raise ValueError(f"select_on={self.select_on!r} is not an eval set; "
                             f"valid: {sorted(self.sets)}.")
        for name in ("every", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Evaluation.{name} must be an int >= 1, got {v!r}.")


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns, for one seed or many.

    Attributes:
      state: the final training state (leading seed axis when the input had one).
      best: one record per seed (a list of length 1 for an unbatched state):
        ``{"params", "batch_stats", "epoch", "metrics", "value"}`` of the selected
        epoch (:attr:`Evaluation.select_on`), or of the last epoch without selection.
      history: one row per evaluation and seed: ``{"epoch", "seed_index", "train",
        <set name>: metrics}``.
    """

    state: TrainState
    best: list[dict]
    history: list[dict]


def num_seeds_of(state: TrainState) -> int:
    """Size of the leading seed axis of a state (0 for a single, unbatched run)."""
    epoch = jnp.shape(state.epoch)
    return int(epoch[0]) if epoch else 0


def _seed_slice(tree, s: int | None):
    """Seed ``s`` of a host (numpy) pytree; ``None``: the tree itself."""
    return tree if s is None else jax.tree_util.tree_map(lambda a: a[s], tree)


def _evaluate_seeds(predict, state: TrainState, eval_sets, seeds) -> list[dict]:
    """Metrics of every seed on every eval set; all seeds in one forward program."""
    out = [{} for _ in seeds]
    for name, es in eval_sets.items():
        logits = predict(state, es["x"])
        for si, s in enumerate(seeds):
            out[si][name] = evaluate(logits if s is None else logits[s], es["y"],
                                     es.get("teacher_logits"), es.get("groups"),
                                     es.get("num_groups", 0))
    return out


def _check_finite(terms, seeds, epoch: int, desc: str):
    """Raises :class:`DivergenceError` naming ``desc``, the seed index and the epoch
    when a mean loss term or the parameters of any seed are not finite."""
    flags = np.reshape(np.asarray(terms.pop(NONFINITE, 0.0)), -1)
    for si, s in enumerate(seeds):
        j = 0 if s is None else s
        bad = [k for k, v in terms.items() if not np.isfinite(np.reshape(v, -1)[j])]
        what = ([f"loss terms {bad}"] if bad else []) + \
            (["parameters"] if flags[min(j, flags.size - 1)] > 0 else [])
        if what:
            raise DivergenceError(
                f"{desc}: training diverged at epoch {epoch} (seed index {si}): non-finite "
                f"{' and '.join(what)}. Lower the learning rate or check the inputs; "
                "nothing of this run was returned as a result.")


def fit(distiller: Distiller, state: TrainState, teacher_vars, train_data: Mapping[str, Any],
        *, epochs: int, batch_size: int, mesh: Mesh | None = None,
        evaluation: Evaluation | None = None, checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 1, index_fn=None, progress: bool = True,
        desc: str = "train") -> FitResult:
    """Trains until ``state.epoch == epochs``; returns a :class:`FitResult`.

    Args:
      distiller: the student, teacher, methods and optimiser.
      state: ``distiller.init(...)``, or a stack of them along a leading seed axis
        (``jax.vmap(distiller.init)``): the seeds then train as one program.
      teacher_vars: the frozen teacher's variables (None without a teacher).
      train_data: dict of arrays (``x``, ``y``, ...), moved to device once; or a
        :class:`kdjax.data.Stream` (data that do not fit in memory, or one process's
        share of a multi-host run): the same plan, step and keys, batches read by
        :func:`kdjax.train.distributed.stream_epoch_runner`.
      epochs: total number of epochs (a resumed run continues up to it).
      batch_size: global batch size (divisible by the mesh's devices).
      mesh: optional ``("data",)`` mesh (data parallel).
      evaluation: what to evaluate and select on (:class:`Evaluation`).
      checkpointer: resume from / save to it, every ``checkpoint_every`` epochs and
        after the last.
      index_fn: optional batch plan, see :meth:`Distiller.epoch_fn`.
      progress, desc: progress bar and its label.
    """
    evaluation = Evaluation() if evaluation is None else evaluation
    eval_sets, select_on = dict(evaluation.sets), evaluation.select_on
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the "
                         f"{mesh.devices.size} devices of the mesh.")
    num_seeds = num_seeds_of(state)
    if (num_seeds > 1 and not isinstance(train_data, Stream) and
            distiller.resolve_seed_mode(train_data["x"], num_seeds, mesh) == "sequential"):
        return _fit_seeds_in_turn(
            distiller, state, teacher_vars, train_data, num_seeds, checkpointer, desc,
            epochs=epochs, batch_size=batch_size, mesh=mesh, evaluation=evaluation,
            checkpoint_every=checkpoint_every, index_fn=index_fn, progress=progress)
    seeds = list(range(num_seeds)) if num_seeds else [None]

    history: list[dict] = []
    # host copies: the device state is donated to the epoch function
    host = jax.device_get((state.params["student"], state.batch_stats))
    best = [{"value": -np.inf, "epoch": -1, "metrics": None,
             "params": _seed_slice(host[0], s), "batch_stats": _seed_slice(host[1], s)}
            for s in seeds]
    start = 0
    if checkpointer is not None:
        restored = checkpointer.restore_latest({"state": state, "best": _best_arrays(best)})
        if restored is not None:
            _, tree, meta = restored
            state = tree["state"]
            history = meta.get("history", [])
            for b, arrays, info in zip(best, tree["best"], meta.get("best", [])):
                b.update(arrays)
                b.update(info)
            start = int(np.asarray(state.epoch).reshape(-1)[0])

    state = replicate(state, mesh)
    tvars = replicate(teacher_vars, mesh)
    if isinstance(train_data, Stream):   # streamed input, same step and plan
        data, epoch_fn = None, stream_epoch_runner(distiller, train_data, batch_size, mesh,
                                                   index_fn=index_fn)
    else:
        data = replicate(jax.device_put(dict(train_data)), mesh)
        epoch_fn = distiller.epoch_runner(batch_size, data["x"], mesh, num_seeds=num_seeds,
                                          index_fn=index_fn)
    predict = distiller.predictor(evaluation.batch_size, mesh, num_seeds=num_seeds)

    bar = tqdm(range(start, epochs), desc=desc, disable=not progress, leave=False,
               initial=start, total=epochs)
    for e in bar:
        state, terms = epoch_fn(state, tvars, data)
        terms = jax.device_get(terms)
        _check_finite(terms, seeds, e + 1, desc)
        last = e + 1 == epochs
        if eval_sets and ((e + 1) % evaluation.every == 0 or last):
            host = None
            for si, (s, metrics) in enumerate(zip(seeds, _evaluate_seeds(
                    predict, state, eval_sets, seeds))):
                row = {"epoch": e + 1, "seed_index": si,
                       "train": {k: float(np.asarray(v).reshape(-1)[si if s is not None else 0])
                                 for k, v in terms.items()},
                       **metrics}
                history.append(row)
                if select_on is not None:
                    value = metrics[select_on][evaluation.metric]
                    if value > best[si]["value"]:
                        if host is None:
                            host = jax.device_get((state.params["student"],
                                                   state.batch_stats))
                        best[si].update(value=value, epoch=e + 1, metrics=metrics,
                                        params=_seed_slice(host[0], s),
                                        batch_stats=_seed_slice(host[1], s))
            if progress:
                bar.set_postfix({k: f"{v['accuracy']:.3f}" for k, v in metrics.items()})
        if checkpointer is not None and ((e + 1) % checkpoint_every == 0 or last):
            checkpointer.save(e + 1, {"state": state, "best": _best_arrays(best)},
                              {"history": history, "best": _best_info(best)})
    bar.close()
    if select_on is None:
        host = jax.device_get((state.params["student"], state.batch_stats))
        for si, s in enumerate(seeds):
            best[si].update(epoch=epochs, params=_seed_slice(host[0], s),
                            batch_stats=_seed_slice(host[1], s),
                            metrics=history[-1] if history else None)
    return FitResult(state=state, best=best, history=history)


def _fit_seeds_in_turn(distiller, state, teacher_vars, train_data, num_seeds, checkpointer,
                       desc, **kwargs) -> FitResult:
    """``fit`` of each seed of a stacked state through the one-seed programs (compiled
    once, run ``num_seeds`` times; :meth:`Distiller.resolve_seed_mode`), each seed with
    its own checkpoints (``<checkpointer>/seed<s>``); the result has the layout of a
    vmapped run (stacked state, one ``best`` per seed, history by epoch then seed)."""
    results = []
    for s in range(num_seeds):
        one = jax.tree_util.tree_map(lambda a: a[s], state)
        ckpt = None if checkpointer is None else checkpointer.subdirectory(f"seed{s}")
        results.append(fit(distiller, one, teacher_vars, train_data, checkpointer=ckpt,
                           desc=f"{desc} seed {s}", **kwargs))
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[r.state for r in results])
    history = sorted(({**row, "seed_index": s} for s, r in enumerate(results)
                      for row in r.history), key=lambda r: (r["epoch"], r["seed_index"]))
    return FitResult(state=stacked, best=[r.best[0] for r in results], history=history)


def _best_arrays(best):
    return [{"params": b["params"], "batch_stats": b["batch_stats"]} for b in best]


def _best_info(best):
    return [{"value": float(b["value"]), "epoch": int(b["epoch"]), "metrics": b["metrics"]}
            for b in best]
