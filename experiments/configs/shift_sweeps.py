"""The ShiftKD paper's other analyses as ``experiments.sweep`` configs over the shift
study (``experiments/shift.py``; one cell = one shift x teacher x method, swept keys
and seeds on top). Each entry is the command line of one sweep: print them with

    python -m experiments.configs.shift_sweeps            # all commands
    python -m experiments.configs.shift_sweeps pruning    # one

and run a printed command as it is (results under ``--out``: ``sweep.jsonl``,
``sweep.md``, one bar chart per metric; mean ± std over ``--seeds``, resumable).

* ``pruning``: data pruning before distillation (ShiftKD Sec. 5): random, EL2N and
  GraNd scores (``kdjax.data.pruning``; scores from the cell's trained teacher), keep
  ratios 0.5 and 0.75, KD student, every quick shift.
* ``augmentation``: KD with each data manipulation of the catalogue (Gaussian noise,
  mixup, CutMix on images, RandAugment-lite, DomainMix across source domains) and
  MixStyle (feature-statistics mixing inside the student, ``kdjax.models.MixStyle``).
* ``optimizer``: SGD with momentum 0.9 vs AdamW, each at peak learning rate 0.05 and
  0.003 (cosine), KD student. Its val accuracy chose the study's default student
  optimiser (AdamW at 0.05; see ``experiments/configs/shift.py``).
"""

from __future__ import annotations

import sys

BASE = ["python -m experiments.sweep experiments.shift --config-arg quick --seeds 3"]
SHIFTS = ["coloured_digits", "spurious_mnist1d", "mnist1d_domains:shear",
          "rotated_digits:75"]


def _shift_sweep(shifts=SHIFTS) -> str:
    return "--sweep \"shift=" + ",".join(repr(s) for s in shifts) + "\""


SWEEPS = {
    "pruning": BASE + [_shift_sweep(), "--sweep \"prune.score='random','el2n','grand'\"",
                       "--sweep prune.keep=0.5,0.75", "--config.method.name=kd",
                       "--out runs/sweeps/pruning"],
    "augmentation": BASE + [
        _shift_sweep(), "--sweep \"method.name='kd','kd+noise','kd+mixup','kd+randaugment',"
        "'kd+domainmix','kd+mixstyle'\"", "--out runs/sweeps/augmentation"],
    "augmentation_images": BASE + [
        _shift_sweep(["coloured_digits", "rotated_digits:75"]),
        "--sweep \"method.name='kd+cutmix'\"", "--out runs/sweeps/augmentation_images"],
    "optimizer": BASE + [
        _shift_sweep(), "--sweep \"student.optimizer.name='sgd','adamw'\"",
        "--sweep \"student.optimizer.learning_rate=0.05,0.003\"",
        "--config.method.name=kd", "--out runs/sweeps/optimizer"],
}


def command(name: str) -> str:
    """The shell command of sweep ``name`` (one of :data:`SWEEPS`)."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid: {sorted(SWEEPS)}.")
    return " \\\n    ".join(SWEEPS[name])


if __name__ == "__main__":
    for n in (sys.argv[1:] or list(SWEEPS)):
        print(f"# {n}\n{command(n)}\n")
