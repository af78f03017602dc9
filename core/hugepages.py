"""Transparent huge pages for XLA-CPU's buffers, by re-executing the script once with glibc's tunable.

XLA-CPU allocates each call's temporary buffers with malloc; large ones are fresh mmaps that the
kernel faults in 4 KiB at a time and zeroes, every call. On this project's 2-core CPU that was
a quarter of the step: the CPU config went from ~53 to ~40 ms per step at one step per call, and
the GPU config (6 GB of temporaries per step, 1.6 M page faults) from ~12.3 to ~9.6 s.
glibc >= 2.35 backs malloc with transparent huge pages when `GLIBC_TUNABLES` holds
`glibc.malloc.hugetlb=1` (read only at process start, hence the re-exec; older glibc ignores it).

Opt out with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` (any value of that tunable is respected).
Must be called before anything else of weight is imported: the process is replaced.
"""
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"


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
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{TUNABLE}=1"))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
