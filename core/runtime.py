"""Process-wide settings, in one place, applied by the main scripts and the benchmarks only.

- Huge pages: the process re-executes itself once with glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  (read only at process start), so XLA-CPU's large per-call buffers are not faulted in and zeroed
  4 KiB at a time on every call. Opt out with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
- `XLA_FLAGS`: XLA-CPU compiles loops under 16 MiB per iteration without multi-row matmuls (the batch-1
  decode loop) into one function instead of dispatching each kernel. A value you set wins.
- The persistent compilation cache (`compile_cache=`): a second run of the same program loads it
  from disk instead of compiling. JAX's own `JAX_COMPILATION_CACHE_DIR` wins.
- `cpu_threads(n)`: the size of XLA-CPU's thread pool (sample.py runs small models on one thread,
  where the second thread's hand-offs cost more than it gives).

Under a debugger or IPython the re-exec is skipped with a one-line note (it would detach them).
benchmarks/README.md has the measurements behind each.
"""
import os
import re
import sys

KEY = "xla_cpu_small_while_loop_byte_threshold"
SMALL_LOOP_BYTES = 1 << 24
XLA_DEFAULT = 1024  # XLA's own threshold when the option is absent
THREAD_VARS = ("PJRT_NPROC", "NPROC")  # XLA's CPU client reads the first one set (xla/pjrt/utils.cc)
TUNABLE = "glibc.malloc.hugetlb"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxlab", "xla")
MIN_COMPILE_VAR = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"  # yours wins over the 0 set below


def configure() -> None:
    """What every main calls first, before JAX is imported: huge pages, then XLA_FLAGS."""
    use_huge_pages()
    apply()


def _attached() -> str | None:
    """The debugger or shell this process runs under, if any."""
    if sys.gettrace() is not None or "pydevd" in sys.modules or "debugpy" in sys.modules:
        return "a debugger"
    if "IPython" in sys.modules:
        return "IPython"
    return None


def use_huge_pages() -> None:
    """Re-execute this Python process (same interpreter, flags and argv) with huge-page malloc."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or TUNABLE in tunables or not sys.executable:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (ValueError, OSError):  # not glibc (musl, ...)
        return
    attached = _attached()
    if attached:
        print(f"note: huge-page malloc skipped under {attached} (it re-executes the process)", file=sys.stderr)
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{TUNABLE}=1"))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def apply(environ=os.environ) -> bool:
    """Add the small-loop threshold to XLA_FLAGS unless it is there already or JAX's backend has started."""
    flags = environ.get("XLA_FLAGS", "")
    if KEY in flags or _backend_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {flag(SMALL_LOOP_BYTES)}".strip()
    return True


def compile_cache(setting: str | None, environ=os.environ) -> str | None:
    """Turn on JAX's persistent compilation cache: "auto" (DEFAULT_CACHE), a directory, or off/None.

    Returns the directory in use, or None. JAX keys each entry on the program, the backend, the
    jax/jaxlib versions and the compile options, so a hit is the same executable. Every program is
    kept, however fast it compiled. An unwritable directory is a warning, and compiling goes on
    without the cache; so is an unreadable entry (JAX warns and compiles it).
    """
    import jax

    if setting in (None, "", "off", "none", False) and not environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if not environ.get(MIN_COMPILE_VAR):
        # JAX's default keeps only programs that took a second to compile: here that would leave out
        # the eval step and the train state's init (0.4-0.8 s each on the CPU config) and the sampler.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
    path = os.path.expanduser(DEFAULT_CACHE if setting == "auto" else str(setting))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError as e:
        print(f"warning: compile_cache={path} is not writable ({e.__class__.__name__}); compiling without it",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def cpu_threads(n: int, environ=os.environ) -> bool:
    """Run this process's XLA-CPU work on `n` threads (n <= 0: one per core, XLA's default).

    A PJRT_NPROC or NPROC you set wins; after the backend has started this does nothing.
    Returns whether the environment changed.
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
