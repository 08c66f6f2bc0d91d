r"""SimCLR self-supervised training of an encoder (teachers and baselines for CoSS).

SimCLR (Chen et al., ICML 2020, arXiv 2002.05709): every example gets two random
augmentations ``v1 = a(x)``, ``v2 = a'(x)``; the encoder ``f`` and a projection head
``g`` map them to ``z = g(f(v))``, and the NT-Xent loss (Eq. 1) makes each view pick
its partner out of the other ``2B - 2`` views of the batch:

.. math::
    \ell_{i,j} = -\log\frac{\exp(\cos(z_i, z_j)/\tau)}
                          {\sum_{k \ne i} \exp(\cos(z_i, z_k)/\tau)},\qquad
    \mathcal{L} = \frac{1}{2B}\sum_{(i,j)\ \text{positive}} \ell_{i,j}

(:func:`nt_xent`, computed by ``optax.ntxent`` with the two views of an example sharing
a label). The representation used afterwards is the encoder's ``"pooled"`` feature,
before the head, as in the paper (Sec. 2.1).

:class:`SimCLR` mirrors :class:`kdjax.train.Distiller`: a whole epoch is one
``lax.scan`` inside one jitted call, the state is a pytree with a ``seed_key``, the
epoch key is ``fold_in(seed_key, epoch)`` (so a resumed run replays the uninterrupted
one), and ``jit_epoch(num_seeds=S)`` ``vmap``-s over a leading seed axis. It never
reads labels: an epoch takes the input array ``x`` only.

Augmentations (:func:`view_augment`): for 1-D signals ``[B, L, C]`` a zero-filled random
shift (:func:`kdjax.data.augment.random_shift`, a crop of the padded signal), for
images ``[B, H, W, C]`` a pad-and-crop (:func:`kdjax.data.augment.random_crop`); then a
random per-example amplitude scaling and additive Gaussian noise. Deviation from the
paper: no colour distortion or blur (they do not exist for 1-D signals / 8x8 digits).

From configs: :func:`make_simclr` builds the trainer (optimiser schedule over the run's
steps, views, head), :meth:`SimCLR.fit_seeds` trains one encoder per seed (all seeds
as one vmapped program), and :func:`cached_encoder` trains an encoder once per config
hash and keeps it in the one on-disk cache (:mod:`kdjax.train.cache`), e.g. the CoSS
driver's SimCLR teacher.

Distilling from such an encoder without labels (CoSS, arXiv 2409.13939, and its
baselines): :func:`label_free_data` is what the student trains on -- the inputs and the
teacher's precomputed embeddings, no labels by construction -- and :func:`neighbor_plan`
the batch plan of CoSS (anchors with sampled teacher neighbours,
:func:`kdjax.data.neighbors.neighbor_batches`) as an ``index_fn`` of the engine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax._checks import check_float_array, check_nonnegative, check_positive
from kdjax._io import config_hash
from kdjax.data import augment as aug
from kdjax.data.neighbors import neighbor_batches
from kdjax.models.projector import Projector
from kdjax.train import cache
from kdjax.train import epoch as epoch_lib
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.optim import make_optimizer

__all__ = ["nt_xent", "view_augment", "SimCLR", "SimCLRState", "make_simclr",
           "cached_encoder", "label_free_data", "neighbor_plan"]


def nt_xent(z1: chex.Array, z2: chex.Array, temperature: chex.Numeric = 0.5) -> chex.Array:
    r"""NT-Xent of two views ``[batch, dim]`` (row ``i`` of both is the same example).

    The ``2B`` projections are compared by cosine similarity; each one's positive is
    the other view of its example and its negatives are the remaining ``2B - 2``
    (SimCLR, arXiv 2002.05709, Eq. 1, averaged over all ``2B`` anchors). Computed by
    ``optax.ntxent`` on ``concat([z1, z2])`` with labels ``[0..B-1, 0..B-1]``, in float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.recipes.simclr import nt_xent
      >>> z = jnp.eye(3)
      >>> round(float(nt_xent(z, z, temperature=1.0)), 4)  # -log(e / (e + 4))
      0.9048

    Args:
      z1: ``[batch, dim]`` projections of the first views.
      z2: ``[batch, dim]`` projections of the second views.
      temperature: ``tau`` (SimCLR: 0.5 for CIFAR-10, 0.1 for ImageNet).
    """
    check_float_array(z1, "z1", ndim=2)
    check_float_array(z2, "z2", ndim=2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {z1.shape} for z1 and "
                         f"{z2.shape} for z2.")
    if z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs a batch of at least 2 examples (negatives), got "
                         f"{z1.shape[0]}.")
    check_positive(temperature, "temperature")
    b = z1.shape[0]
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    labels = jnp.concatenate([jnp.arange(b), jnp.arange(b)])
    return optax.ntxent(z, labels, temperature)


def view_augment(max_shift: int = 4, scale: float = 0.2,
                 noise_std: float = 0.1) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A random view ``fn(key, x) -> x`` for signals ``[B, L, C]`` or images ``[B, H, W, C]``.

    Applied in order, independently per example: a zero-filled shift by up to
    ``max_shift`` positions (images: pad ``max_shift`` and crop), an amplitude factor
    drawn uniformly from ``[1 - scale, 1 + scale]``, and ``N(0, noise_std^2)`` noise.
    ``0`` switches a part off. Jittable and deterministic from ``key``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.recipes.simclr import view_augment
      >>> view_augment(2)(jax.random.PRNGKey(0), jnp.ones((4, 40, 1))).shape
      (4, 40, 1)
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}.")
    check_nonnegative(scale, "scale")
    if scale >= 1:
        raise ValueError(f"scale must be < 1 (the amplitude factor stays positive), "
                         f"got {scale}.")
    check_nonnegative(noise_std, "noise_std")

    def fn(key, x):
        check_float_array(x, "x", ndim=(3, 4))
        k_shift, k_scale, k_noise = jax.random.split(key, 3)
        if max_shift:
            x = (aug.random_shift(k_shift, x, max_shift) if x.ndim == 3
                 else aug.random_crop(k_shift, x, max_shift))
        if scale:
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            x = x * jax.random.uniform(k_scale, shape, x.dtype, 1 - scale, 1 + scale)
        if noise_std:
            x = aug.gaussian_noise(k_noise, x, noise_std)
        return x

    return fn


@flax.struct.dataclass
class SimCLRState:
    """Everything a SimCLR run needs to continue (checkpoint this)."""

    epoch: jax.Array
    step: jax.Array
    params: Any          # {"encoder": ..., "head": ...}
    batch_stats: Any     # encoder BatchNorm statistics ({} when none)
    opt_state: Any
    seed_key: jax.Array  # raw uint32 PRNG key of the run


@dataclasses.dataclass(frozen=True, eq=False)
class SimCLR:
    """SimCLR training of ``encoder`` (a kdjax model returning ``(logits, features)``).

    Attributes:
      encoder: Flax module; its ``features[feature]`` (``[B, D]``) is the representation.
      tx: optax optimiser over ``{"encoder", "head"}`` params.
      augment: ``fn(key, x) -> x`` random view (see :func:`view_augment`).
      temperature: NT-Xent ``tau``.
      proj_dim, hidden_dim: the projection head ``Dense(hidden) -> ReLU -> Dense(proj)``
        (SimCLR's 2-layer MLP head; :class:`kdjax.models.projector.Projector`).
      feature: name of the encoder feature fed to the head.

    Both views go through the encoder as one batch of ``2B`` (BatchNorm statistics over
    both views, as SimCLR on one device).
    """

    encoder: nn.Module
    tx: optax.GradientTransformation
    augment: Callable[[jax.Array, jax.Array], jax.Array]
    temperature: float = 0.5
    proj_dim: int = 64
    hidden_dim: int = 256
    feature: str = "pooled"

    def __post_init__(self):
        check_positive(self.temperature, "temperature")

    @property
    def head(self) -> Projector:
        return Projector(out_dim=self.proj_dim, hidden_dim=self.hidden_dim)

    def _embed(self, params, batch_stats, x, train: bool):
        vs = {"params": params["encoder"], **({"batch_stats": batch_stats} if batch_stats else {})}
        if train and batch_stats:
            (_, feats), upd = self.encoder.apply(vs, x, train=True, mutable=["batch_stats"])
            batch_stats = upd["batch_stats"]
        else:
            _, feats = self.encoder.apply(vs, x, train=train)
        if self.feature not in feats:
            raise ValueError(f"unknown encoder feature {self.feature!r}; available: "
                             f"{sorted(feats)}.")
        return feats[self.feature], batch_stats

    def init(self, seed: int | jax.Array, example_x) -> SimCLRState:
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        k_enc, k_head = jax.random.split(jax.random.fold_in(key, 1))
        x = jnp.asarray(example_x)
        variables = self.encoder.init(k_enc, x, train=False)
        params = {"encoder": variables["params"]}
        batch_stats = variables.get("batch_stats", {})
        h, _ = self._embed(params, batch_stats, x, train=False)
        params["head"] = self.head.init(k_head, h, train=False)["params"]
        return SimCLRState(epoch=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32),
                           params=params, batch_stats=batch_stats,
                           opt_state=self.tx.init(params), seed_key=key)

    def loss_fn(self, params, batch_stats, x, key):
        """NT-Xent of two random views of ``x``; returns ``(loss, new_batch_stats)``."""
        k1, k2 = jax.random.split(key)
        b = x.shape[0]
        views = jnp.concatenate([self.augment(k1, x), self.augment(k2, x)], axis=0)
        h, new_bs = self._embed(params, batch_stats, views, train=True)
        z = self.head.apply({"params": params["head"]}, h, train=True)
        return nt_xent(z[:b], z[b:], self.temperature), new_bs

    def train_step(self, state: SimCLRState, x, key):
        (loss, new_bs), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                                                                              updates),
                             batch_stats=new_bs, opt_state=opt_state), loss

    def _step(self, state: SimCLRState, consts, x, key):
        del consts   # the epoch loop's shared constants: SimCLR has none
        return self.train_step(state, x, key)

    def epoch_fn(self, batch_size: int):
        """``epoch(state, x) -> (state, mean loss)``: ``len(x) // batch_size`` steps over
        a permutation drawn from ``fold_in(seed_key, epoch)``; pure (vmappable). The
        epoch loop of :mod:`kdjax.train.epoch` in scan mode."""
        fn = epoch_lib.epoch_fn(self._step, batch_size)
        return lambda state, x: fn(state, None, x)

    def jit_epoch(self, batch_size: int, *, num_seeds: int = 0):
        """Jitted epoch (state donated); ``num_seeds > 0`` vmaps over a seed axis."""
        run = epoch_lib.make_epoch(self._step, batch_size, num_seeds=num_seeds)
        return lambda state, x: run(state, None, x)

    def encoder_variables(self, state: SimCLRState) -> dict:
        """``{"params", ["batch_stats"]}`` of the encoder, for ``encoder.apply``."""
        out = {"params": state.params["encoder"]}
        if state.batch_stats:
            out["batch_stats"] = state.batch_stats
        return out

    def fit(self, state: SimCLRState, x, *, epochs: int, batch_size: int,
            num_seeds: int = 0, checkpointer=None, checkpoint_every: int = 0,
            progress: bool = False, desc: str = "simclr"):
        """Trains until ``state.epoch == epochs``; returns ``(state, losses)``.

        With a :class:`kdjax.train.Checkpointer` the run resumes from its newest
        readable checkpoint and saves every ``checkpoint_every`` epochs (and at the end).
        """
        from tqdm.auto import tqdm

        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and "
                             f"{batch_size}.")
        start, losses = 0, []
        if checkpointer is not None:
            restored = checkpointer.restore_latest({"state": state})
            if restored is not None:
                _, tree, meta = restored
                state, losses = tree["state"], list(meta.get("losses", []))
                start = int(jnp.ravel(state.epoch)[0])
        x = jnp.asarray(x)
        epoch_fn = self.jit_epoch(batch_size, num_seeds=num_seeds)
        for e in tqdm(range(start, epochs), desc=desc, disable=not progress, leave=False,
                      initial=start, total=epochs):
            state, loss = epoch_fn(state, x)
            losses.append(jnp.ravel(loss).tolist())
            last = e + 1 == epochs
            if checkpointer is not None and (last or (checkpoint_every
                                                      and (e + 1) % checkpoint_every == 0)):
                checkpointer.save(e + 1, {"state": state}, {"losses": losses})
        return state, losses

    def fit_seeds(self, x, seeds: Sequence[int], *, epochs: int, batch_size: int,
                  vmap: bool = True, ckpt_dir: str | None = None, name: str = "simclr",
                  checkpoint_every: int = 0, progress: bool = False, desc: str = "simclr"):
        """One encoder per seed; ``[(encoder variables on host, per-epoch losses)]``.

        With ``vmap`` and several seeds, all of them train as one vmapped program
        (:meth:`fit` with ``num_seeds``), checkpointed in ``<ckpt_dir>/<name>_<s1>_<s2>...``;
        otherwise one after the other, seed ``s`` in ``<ckpt_dir>/<name>_<s>`` (the layout
        of the drivers' ``fit_seeds``). Seed ``s`` starts from ``PRNGKey(s)`` either way.
        ``ckpt_dir=None``: no checkpoints.
        """
        seeds = [int(s) for s in seeds]
        vm = vmap and len(seeds) > 1
        example = jnp.asarray(x[:2])
        out = []
        for group in [seeds] if vm else [[s] for s in seeds]:
            if vm:
                keys = jnp.stack([jax.random.PRNGKey(s) for s in group])
                state = jax.vmap(lambda k: self.init(k, example))(keys)
            else:
                state = self.init(group[0], example)
            ckpt = None if ckpt_dir is None else Checkpointer(
                os.path.join(ckpt_dir, name + "_" + "_".join(map(str, group))))
            state, losses = self.fit(state, x, epochs=epochs, batch_size=batch_size,
                                     num_seeds=len(group) if vm else 0, checkpointer=ckpt,
                                     checkpoint_every=checkpoint_every, progress=progress,
                                     desc=desc)
            for i in range(len(group)):
                one = jax.tree_util.tree_map(lambda a: a[i], state) if vm else state
                out.append((jax.device_get(self.encoder_variables(one)),
                            [epoch_losses[i] for epoch_losses in losses]))
        return out


def make_simclr(encoder: nn.Module, optimizer: Mapping[str, Any], *, num_examples: int,
                batch_size: int, epochs: int, temperature: float = 0.5, proj_dim: int = 64,
                hidden_dim: int = 256, max_shift: int = 4, scale: float = 0.2,
                noise_std: float = 0.1) -> SimCLR:
    """A :class:`SimCLR` trainer from configs.

    ``optimizer`` is a :func:`kdjax.train.make_optimizer` config whose schedule spans the
    run: ``epochs * (num_examples // batch_size)`` steps. The keyword options are those of
    an ``ssl`` config: the views (:func:`view_augment`: ``max_shift``, ``scale``,
    ``noise_std``), the NT-Xent ``temperature`` and the projection head's ``proj_dim`` and
    ``hidden_dim``.
    """
    steps = num_examples // batch_size
    tx = make_optimizer(optimizer, total_steps=steps * epochs, steps_per_epoch=steps)
    return SimCLR(encoder, tx, view_augment(max_shift, scale, noise_std),
                  temperature=temperature, proj_dim=proj_dim, hidden_dim=hidden_dim)


def cached_encoder(encoder: nn.Module, x, *, config: Mapping[str, Any],
                   ssl: Mapping[str, Any], data: Mapping[str, Any], cache_dir: str,
                   progress: bool = False, prefix: str = "teacher_simclr"):
    """A SimCLR-trained ``encoder`` on inputs ``x``, trained once and cached.

    ``config`` holds the run's ``optimizer``, ``epochs``, ``batch_size`` and ``seed`` (and
    whatever else identifies the encoder, e.g. its model); ``ssl`` the options of
    :func:`make_simclr`; ``data`` the identity of ``x`` (its dataset config). The entry is
    ``f"{prefix}_{key}"`` with ``key = config_hash("simclr", config, ssl, data)`` in the
    one cache (:func:`kdjax.train.cache.get_or_build`); the build checkpoints every
    epoch into the entry's checkpoint directory, so a killed build resumes.

    Returns ``(encoder variables, meta)``; ``meta`` has ``kind``, ``config``, ``ssl``,
    ``data``, ``key``, the per-epoch ``losses`` and ``cached`` (read from the cache or
    trained now).
    """
    key = config_hash("simclr", config, ssl, data)
    epochs, batch_size = config["epochs"], config["batch_size"]

    def build(ckpt_dir):
        trainer = make_simclr(encoder, config["optimizer"], num_examples=len(x),
                              batch_size=batch_size, epochs=epochs, **ssl)
        state, losses = trainer.fit(trainer.init(int(config["seed"]), x[:2]), x,
                                    epochs=epochs, batch_size=batch_size,
                                    checkpointer=Checkpointer(ckpt_dir), checkpoint_every=1,
                                    progress=progress, desc=prefix)
        return trainer.encoder_variables(state), {
            "kind": "simclr", "config": config, "ssl": ssl, "data": data, "key": key,
            "losses": losses}

    template = encoder.init(jax.random.PRNGKey(0), x[:2], train=False)
    return cache.get_or_build(cache_dir, f"{prefix}_{key}", template, build,
                              what=f"SimCLR encoder {prefix}_{key}")


def label_free_data(x, teacher_features, *, feature: str = "pooled") -> dict:
    """What a student distilled without labels trains on: inputs and teacher embeddings.

    ``{"x": x, "teacher_logits": [N, 0], "teacher_features": {feature: teacher_features}}``
    (float32) for a :class:`kdjax.train.Distiller` with ``teacher_from_batch=True``.
    There is no ``"y"`` (nor any label-derived array) in it, so no loss term can read
    labels; ``teacher_logits`` is an empty placeholder of the engine's
    ``teacher_from_batch`` contract (the CoSS-family methods read features only).

    Examples:
      >>> import numpy as np
      >>> from kdjax.recipes.simclr import label_free_data
      >>> sorted(label_free_data(np.zeros((4, 8, 1)), np.zeros((4, 3))))
      ['teacher_features', 'teacher_logits', 'x']
    """
    n = len(x)
    if len(teacher_features) != n:
        raise ValueError(f"teacher_features must have one row per input ({n}), got "
                         f"{len(teacher_features)}.")
    return {"x": np.asarray(x, np.float32),
            "teacher_logits": np.zeros((n, 0), np.float32),
            "teacher_features": {feature: np.asarray(teacher_features, np.float32)}}


def neighbor_plan(neighbors, batch_size: int, *, num_sampled: int, num_candidates: int):
    """``index_fn(key, n)`` for :meth:`kdjax.train.Distiller.epoch_fn`: the first
    ``n // batch_size`` batches of CoSS neighbour groups
    (:func:`kdjax.data.neighbors.neighbor_batches` over the teacher k-NN graph
    ``neighbors``), so an epoch has the same number of steps as a random-batch epoch."""
    neighbors = jnp.asarray(neighbors, jnp.int32)

    def index_fn(key, n):
        plan = neighbor_batches(key, neighbors, batch_size, num_sampled=num_sampled,
                                num_candidates=num_candidates)
        return plan[: n // batch_size]

    return index_fn
