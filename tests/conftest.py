"""Fake CPU devices before JAX is imported; tiny configs and data shared by the tests."""
import os
import subprocess
import sys
import tempfile

# The tests compile with LLVM at -O0: compiling is most of a tiny test program's time, and XLA's own
# passes still run, so a test checks the program a user runs with less optimised machine code. Every
# process of a test compiles alike (devices_env), since the levels' floats differ in the last bits;
# XLA_FLAGS=--xla_backend_optimization_level=3 tests at the default.
OPT_KEY = "--xla_backend_optimization_level"
_flags = os.environ.get("XLA_FLAGS", "").split()
OPT = next((f for f in _flags if f.startswith(OPT_KEY)), f"{OPT_KEY}=0")
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags + [OPT, "--xla_force_host_platform_device_count=8"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the whole pytest run: the many subprocess runs of the same tiny programs
# compile once (results are bitwise the same; it only saves time on 2 cores).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import config, runtime  # noqa: E402

runtime.apply()  # XLA_FLAGS as train.py and sample.py set them (core/runtime.py); before any test starts JAX
config.register()

# The debug experiment, on one device unless a test asks for a mesh: fast to compile on 2 cores.
TINY = ["+experiment=debug", "mesh.data=1"]


def compose(overrides, config_name="train"):
    """The config `python train.py OVERRIDES` would run with."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def devices_env(n=1, **extra):
    """os.environ for a subprocess that sees n CPU devices and compiles as the tests do."""
    return {**os.environ, "XLA_FLAGS": OPT + (f" --xla_force_host_platform_device_count={n}" if n > 1 else ""),
            **extra}


def run_cli(script, *args, timeout=300, env=None, stdin=None, cwd=ROOT):
    """Run `python SCRIPT ARGS` in `cwd` (a checkout) as a user would, on one CPU device; the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(cwd, script), *args], cwd=cwd, env=devices_env(**(env or {})),
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


def make_text(n_chars=20_000, seed=0):
    """Pseudo-English with structure a tiny model can learn quickly."""
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "and", "of", "to", "my", "lord", "thou", "art", "good", "night", "sweet"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        out.append(line.capitalize() + ".\n")
    return "".join(out)[:n_chars]


@pytest.fixture(scope="package")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(make_text())
    return str(path)


@pytest.fixture(scope="package")
def trained_run(tmp_path_factory, text_file):
    """One tiny LM run, trained once per pytest invocation, for the tests that only read or start from a run."""
    from core.loop import run

    out = str(tmp_path_factory.mktemp("trained") / "run")
    result = run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=20", "eval_every=10",
                                 "ckpt_every=10"]))
    assert result["step"] == 20
    return out


def curve(run_dir, skip=()):
    """The logged values of a run, without the wall-clock fields."""
    from core import metrics

    return [{k: v for k, v in r.items() if k != "time_s" and not k.endswith("_per_s")}
            for r in metrics.read(os.path.join(run_dir, "metrics.jsonl")) if r["step"] not in skip]
