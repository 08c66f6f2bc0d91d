"""Streaming input vs the step it feeds: is a 224 px run input-bound or compute-bound?

    python -m benchmarks.input_pipeline [--workers 0,2] [--batch 32] [--images 256]
                                        [--model tv_resnet18] [--size 224]

Input: a TFDS ``array_record`` dataset of JPEGs (generated here: ``--images`` random
500x375 photos-sized images in a DomainBed-layout folder, prepared with
:func:`kdjax.data.domainbed.domainbed_builder`), read by a :class:`kdjax.data.Stream`
with the training transform (JPEG decode, RandomResizedCrop to ``--size``, flip,
normalise) in ``--workers`` grain worker processes (0: threads in this process).
Measured: images/s of one process pulling batches of ``--batch`` (warm-up batch
excluded). Compute: one jitted KD train step (``--model`` student, same network as the
teacher, CE + KD) on a batch of that shape, images/s from its median time
(:func:`benchmarks._common.time_fn`, compilation excluded). ``bound`` says which of
the two limits a run on this machine. CPU here; on an accelerator the step column
changes, the input column is host CPU work and scales with ``--workers`` and cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks._common import report, time_fn


def make_folder(root: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, "photo", f"c{i % 10}")
        os.makedirs(d, exist_ok=True)
        # smooth + noise, so JPEG sizes are photo-like (not incompressible noise)
        base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
        arr = np.clip(np.asarray(img, np.int16) + rng.integers(-8, 8, (375, 500, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)


def input_rate(stream, batch: int, max_batches: int) -> float:
    it = stream.batches(batch, seed=0)
    next(it)   # warm-up: worker start, first decode
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(it):
        n += b["x"].shape[0]
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def step_rate(model: str, batch: int, size: int) -> float:
    from kdjax import methods, models
    from kdjax.train import Distiller, make_optimizer

    student = models.create(model, 10)
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                         "schedule": "constant"}, total_steps=10, steps_per_epoch=10)
    d = Distiller(student, (methods.build({"name": "ce", "weight": 0.5}),
                            methods.build({"name": "kd", "weight": 0.5})), tx,
                  teacher=student)
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    y = np.zeros((batch,), np.int32)
    tvars = student.init(jax.random.PRNGKey(1), x[:1])
    state = d.init(0, x[:1], tvars)
    step = jax.jit(d.train_step)
    b = {"x": jax.numpy.asarray(x), "y": jax.numpy.asarray(y)}
    t = time_fn(lambda: step(state, tvars, b, jax.random.PRNGKey(0)), repeats=3,
                min_time=0.5)
    return batch / t["median_s"]


def main(argv=None):
    from kdjax.data import Stream, image_transform
    from kdjax.data.domainbed import domainbed_builder

    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--model", default="tv_resnet18")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(os.path.join(tmp, "folder"), a.images)
        b = domainbed_builder(os.path.join(tmp, "folder"), "photo",
                              data_dir=os.path.join(tmp, "tfds"))
        b.download_and_prepare()
        source = b.as_data_source("train")
        max_batches = max(1, a.images // a.batch - 1)
        step_ips = step_rate(a.model, a.batch, a.size)
        rows = []
        for w in [int(v) for v in a.workers.split(",")]:
            stream = Stream(source, 10, image_transform(size=a.size, train=True),
                            num_workers=w)
            ips = input_rate(stream, a.batch, max_batches)
            rows.append({"workers": w, "batch": a.batch, "size": a.size,
                         "input_img_per_s": round(ips, 1), "model": a.model,
                         "step_img_per_s": round(step_ips, 1),
                         "bound": "input" if ips < step_ips else "compute"})
    report("input_pipeline", rows, extra={"images": a.images, "cpu_count": os.cpu_count(),
                                          "backend": jax.default_backend()})


if __name__ == "__main__":
    main()
