"""XLA-CPU runs small loops as one compiled function: `apply()` before JAX starts its backend.

XLA-CPU executes a program kernel by kernel (its thunk runtime): each fusion and dot is dispatched
on its own, and a loop body's kernels are scheduled as a dataflow graph on the intra-op thread pool.
For a batch-1 decode step of a small model that dispatch is much of the step: ~130 kernels a token,
each a few hundred nanoseconds of work. XLA's `SmallWhileLoopHoistingPass` compiles a while loop
that touches fewer than `xla_cpu_small_while_loop_byte_threshold` bytes per iteration (default 1024)
into one function that runs on the calling thread, with no dispatch. `apply()` raises the threshold to
`SMALL_LOOP_BYTES` (16 MiB). On this project's 2-core CPU the CPU config's batch-1 sampler went from
12.7k to 14.4k tokens/s (best call; medians +23-37%) and compiles in 6 s instead of 9
(`python benchmarks/small_loops.py`, which runs it off and on; benchmarks/README.md).

What it touches: only loops without multi-row matmuls (those are YNNPACK kernels, which the pass
leaves alone) and under 16 MiB per iteration: batch-1 decode loops of small models and small PRNG
loops. The training steps of the experiment configs hoist the same loops as with XLA's default
(counted in the compiled HLO; benchmarks/README.md). Off CPU it should do nothing: XLA hands only
extra options without the `xla_` prefix to LLVM, and only XLA-CPU reads this key (from XLA's source;
not run on a GPU or TPU here).

The setting is read once per process, when JAX initialises its backend, so entry points (train.py,
sample.py, benchmarks/, tests/conftest.py) call `apply()` at the top. A script of your own that
reloads a run can do the same, or set it in XLA_FLAGS. A value you set yourself in XLA_FLAGS wins.
"""
import os
import re
import sys

KEY = "xla_cpu_small_while_loop_byte_threshold"
SMALL_LOOP_BYTES = 1 << 24
XLA_DEFAULT = 1024  # XLA's own threshold when the option is absent


def apply(environ=os.environ) -> bool:
    """Add the threshold to XLA_FLAGS unless it is there already or JAX's backend has started.

    Returns whether XLA_FLAGS was changed.
    """
    flags = environ.get("XLA_FLAGS", "")
    if KEY in flags or _backend_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {flag(SMALL_LOOP_BYTES)}".strip()
    return True


def flag(threshold: int) -> str:
    """The XLA_FLAGS entry that sets the threshold (XLA reads it from its backend extra options)."""
    return f"--xla_backend_extra_options={KEY}={threshold}"


def small_loop_bytes(environ=os.environ) -> int:
    """The threshold this process's XLA-CPU compiles with: XLA_FLAGS' value, else XLA's default."""
    found = re.findall(rf"{KEY}=(\d+)", environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else XLA_DEFAULT


def _backend_started() -> bool:
    """Whether JAX has started a backend (XLA_FLAGS would no longer be read)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without the helper: assume not started
        return False
