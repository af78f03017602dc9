"""Process-wide XLA-CPU settings, read once when JAX starts its backend: call these before it does.

`apply()`: XLA-CPU runs small loops as one compiled function. `cpu_threads(n)`: the size of XLA-CPU's
thread pool (sample.py runs small models on one thread; see `cpu_threads`).

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
THREAD_VARS = ("PJRT_NPROC", "NPROC")  # XLA's CPU client reads the first one set (xla/pjrt/utils.cc)


def apply(environ=os.environ) -> bool:
    """Add the threshold to XLA_FLAGS unless it is there already or JAX's backend has started.

    Returns whether XLA_FLAGS was changed.
    """
    flags = environ.get("XLA_FLAGS", "")
    if KEY in flags or _backend_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {flag(SMALL_LOOP_BYTES)}".strip()
    return True


def cpu_threads(n: int, environ=os.environ) -> bool:
    """Run this process's XLA-CPU work on `n` threads (n <= 0: one per core, XLA's default).

    XLA's CPU client sizes its thread pool from PJRT_NPROC (else NPROC, else the cores it may run on)
    when JAX starts its backend. For a small model the pool's second thread costs more than it gives
    (the CPU config's slide prefills and batch-16 decode steps are kernels of a few microseconds each;
    one thread spares their hand-offs between cores, our reading, not profiled). On one thread its sampler's
    median call was 9-14% faster at batch 1 and 8-18% at batch 16, its best call 0-6% and -7..+20%
    (`python benchmarks/small_loops.py --threads-ab [--batch 16]`); a 6L/384 model's batch-1 decode,
    limited by reading 42 MB of weights a token, ran 0-7% slower in a probe (benchmarks/README.md).
    Training wants every core, so only sample.py calls this. A PJRT_NPROC or NPROC you set wins;
    after the backend has started this does nothing. Returns whether the environment changed.
    """
    if n <= 0 or any(k in environ for k in THREAD_VARS) or _backend_started():
        return False
    environ[THREAD_VARS[0]] = str(n)
    return True


def cpu_thread_count(environ=os.environ) -> int:
    """The threads XLA-CPU's pool has (or will have) in this process: PJRT_NPROC, NPROC, else the usable cores."""
    for k in THREAD_VARS:
        if environ.get(k, "").strip().isdigit():
            return max(int(environ[k]), 1)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
