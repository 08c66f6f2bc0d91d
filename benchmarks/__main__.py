"""Run every benchmark: ``python -m benchmarks [--only name,name]``."""

import argparse
import importlib

ALL = ["train_step", "vs_torch", "seeds", "scaling", "memory", "losses", "ot", "influence",
       "bounds"]

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--only", default=",".join(ALL))
args = p.parse_args()
for name in args.only.split(","):
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        print(f"skipping {name}: {e}")
        continue
    mod.main([])
