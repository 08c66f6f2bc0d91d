"""The light core install: metadata, wheel contents and imports without the extras.

``pip install kdjax`` installs jax, flax, optax, ott-jax, chex, numpy and scipy; the
data / train / experiments stacks are extras. The import test runs in a fresh
interpreter whose import system refuses every extra-only package (what a core-only
venv looks like to Python), imports kdjax.losses, kdjax.influence and kdjax.faithful,
evaluates losses (ott-jax included) and checks none of the extras was imported.
"""

import configparser
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = {"jax", "flax", "optax", "ott-jax", "chex", "numpy", "scipy"}
EXTRA_ONLY = ["tensorflow_datasets", "tensorflow", "orbax", "matplotlib", "sklearn",
              "ml_collections", "mnist1d", "array_record", "grain", "tqdm", "ot", "torch"]


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _names(block):
    import re
    return {re.split(r"[<>=!~\[ ;]", line.strip())[0].lower()
            for line in block.strip().splitlines() if line.strip() and not line.startswith("#")}


def test_core_requirements_and_extras():
    cfg = _cfg()
    assert _names(cfg["options"]["install_requires"]) == CORE
    req = (ROOT / "requirements.txt").read_text()
    assert _names("\n".join(l for l in req.splitlines() if not l.startswith("#"))) == CORE
    extras = cfg["options.extras_require"]
    assert {"data", "train", "experiments", "test", "bench", "all"} <= set(extras)
    assert {"tensorflow-datasets", "array-record", "mnist1d", "scikit-learn"} <= _names(extras["data"])
    assert {"orbax-checkpoint", "ml_collections", "tqdm"} <= _names(extras["train"])
    assert "matplotlib" in _names(extras["experiments"])
    assert "kdjax[data,train]" in extras["experiments"]
    assert "kdjax[experiments]" in extras["test"]


def test_wheel_packages_are_kdjax_only():
    import setuptools
    include = [p.strip() for p in
               _cfg()["options.packages.find"]["include"].replace("\n", ",").split(",")
               if p.strip()]
    pkgs = setuptools.find_packages(str(ROOT), include=include)
    assert "kdjax" in pkgs and "kdjax.losses" in pkgs
    assert {p.split(".")[0] for p in pkgs} == {"kdjax"}, sorted(pkgs)


def test_readme_commands_install_the_right_extras():
    lines = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("```")[1]
    cmds = [l for l in lines.splitlines() if l.strip() and not l.startswith(("bash", "#"))]
    assert 'pip install -e ".[experiments]"' in cmds[0] and "experiments.shift" in cmds[0]
    assert 'pip install -e ".[test]"' in cmds[1] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"TEST_CMD='{cmds[1]}'" in ci


_CORE_ONLY = textwrap.dedent("""
    import importlib.abc, os, sys
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    BLOCK = set(sys.argv[1].split(","))

    class CoreOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r} (core install)")
            return None

    sys.meta_path.insert(0, CoreOnly())
    import jax.numpy as jnp
    import kdjax.losses as L, kdjax.influence, kdjax.faithful
    assert "ott" not in sys.modules, "import kdjax.losses imported ott-jax"
    x = jnp.arange(12.0).reshape(6, 2) / 7.0
    vals = [L.kd(x, x[::-1]), L.sinkhorn(x, x + 1.0), L.exact_ot(x, x + 1.0), L.rkd(x, x)]
    assert all(bool(jnp.isfinite(v)) for v in vals), vals
    loaded = sorted(BLOCK & {m.split(".")[0] for m in sys.modules})
    assert not loaded, loaded
    print("core-only ok")
""")


@pytest.mark.slow
def test_core_install_imports_losses_influence_faithful_without_extras():
    out = subprocess.run([sys.executable, "-c", _CORE_ONLY, ",".join(EXTRA_ONLY)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "core-only ok" in out.stdout, out.stderr[-3000:]
