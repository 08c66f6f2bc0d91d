"""``fit``: epochs on device, evaluation, model selection and checkpoint/resume.

A run is killed-safe: the state (incl. the epoch counter, optimiser state, the best
model so far and the metric history) is checkpointed every ``checkpoint_every`` epochs;
a restarted ``fit`` with the same checkpointer resumes from the newest readable
checkpoint and, since epoch keys are ``fold_in(seed_key, epoch)``, ends with exactly
the parameters of an uninterrupted run.

Several seeds can train as one program: pass a state with a leading seed axis
(``jax.vmap(distiller.init)``) and ``num_seeds=S``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from kdjax.train.checkpoint import Checkpointer
from kdjax.train.engine import Distiller, TrainState, evaluate, replicate

__all__ = ["EvalSet", "fit"]


class EvalSet(dict):
    """``EvalSet(x=..., y=..., teacher_logits=None, groups=None, num_groups=0)``."""


def _seed_slice(tree, s: int | None):
    return tree if s is None else jax.tree_util.tree_map(lambda a: a[s], tree)


def _evaluate_state(distiller: Distiller, state: TrainState, eval_sets, batch_size, mesh):
    out = {}
    for name, es in eval_sets.items():
        logits = distiller.predict(state, es["x"], batch_size, mesh)
        out[name] = evaluate(logits, es["y"], es.get("teacher_logits"), es.get("groups"),
                             es.get("num_groups", 0))
    return out


def fit(distiller: Distiller, state: TrainState, teacher_vars, train_data: Mapping[str, Any],
        *, epochs: int, batch_size: int, mesh: Mesh | None = None,
        eval_sets: Mapping[str, EvalSet] | None = None, eval_every: int = 1,
        select_on: str | None = None, select_metric: str = "accuracy",
        checkpointer: Checkpointer | None = None, checkpoint_every: int = 1,
        num_seeds: int = 0, progress: bool = True, desc: str = "train", index_fn=None):
    """Trains for ``epochs`` epochs; returns ``(state, best, history)``.

    Args:
      train_data: dict of arrays (``x``, ``y``, ...), moved to device once.
      eval_sets: named evaluation sets, evaluated every ``eval_every`` epochs and at the
        end; ``history`` holds one dict per evaluation.
      select_on: name of the eval set used for model selection (e.g. ``"val"``); the
        ``best`` returned is ``{"params", "batch_stats", "epoch", "metrics"}`` of the
        best epoch per seed. Never select on a test split.
      checkpointer: resume from / save to it.
      num_seeds: 0 for a single run; ``S`` when ``state`` has a leading seed axis.
      index_fn: optional batch plan, see :meth:`Distiller.epoch_fn`.
    """
    eval_sets = dict(eval_sets or {})
    if select_on is not None and select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not an eval set; "
                         f"valid: {sorted(eval_sets)}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the "
                         f"{mesh.devices.size} devices of the mesh.")
    seeds = list(range(num_seeds)) if num_seeds else [None]

    def select_value(metrics):
        return metrics[select_on][select_metric] if select_on else None

    history: list[dict] = []
    # host copies: the device state is donated to the epoch function
    best = [{"value": -np.inf, "epoch": -1, "metrics": None,
             "params": jax.device_get(_seed_slice(state.params["student"], s)),
             "batch_stats": jax.device_get(_seed_slice(state.batch_stats, s))} for s in seeds]
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
    data = replicate(jax.tree_util.tree_map(jnp.asarray, dict(train_data)), mesh)
    tvars = replicate(teacher_vars, mesh)
    epoch_fn = distiller.epoch_runner(batch_size, data["x"], mesh, num_seeds=num_seeds,
                                      index_fn=index_fn)

    bar = tqdm(range(start, epochs), desc=desc, disable=not progress, leave=False,
               initial=start, total=epochs)
    for e in bar:
        state, terms = epoch_fn(state, tvars, data)
        last = e + 1 == epochs
        if eval_sets and ((e + 1) % eval_every == 0 or last):
            for si, s in enumerate(seeds):
                st = _seed_slice(state, s)
                metrics = _evaluate_state(distiller, st, eval_sets, 512, mesh)
                row = {"epoch": e + 1, "seed_index": si,
                       "train": {k: float(np.asarray(v).reshape(-1)[si if s is not None else 0])
                                 for k, v in terms.items()},
                       **metrics}
                history.append(row)
                value = select_value(metrics)
                if value is not None and value > best[si]["value"]:
                    best[si].update(value=value, epoch=e + 1, metrics=metrics,
                                    params=jax.device_get(st.params["student"]),
                                    batch_stats=jax.device_get(st.batch_stats))
            if progress:
                bar.set_postfix({k: f"{v['accuracy']:.3f}" for k, v in metrics.items()})
        if checkpointer is not None and ((e + 1) % checkpoint_every == 0 or last):
            checkpointer.save(e + 1, {"state": state, "best": _best_arrays(best)},
                              {"history": history, "best": _best_info(best)})
    bar.close()
    if select_on is None:
        for si, s in enumerate(seeds):
            st = _seed_slice(state, s)
            best[si].update(epoch=epochs, params=jax.device_get(st.params["student"]),
                            batch_stats=jax.device_get(st.batch_stats),
                            metrics=history[-1] if history else None)
    return state, (best if num_seeds else best[0]), history


def _best_arrays(best):
    return [{"params": b["params"], "batch_stats": b["batch_stats"]} for b in best]


def _best_info(best):
    return [{"value": float(b["value"]), "epoch": int(b["epoch"]), "metrics": b["metrics"]}
            for b in best]
