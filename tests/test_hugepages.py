"""train.py, sample.py and the benchmarks re-execute themselves once with huge-page malloc (core/runtime.py)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHOW = ("from core.runtime import use_huge_pages; use_huge_pages(); import os, sys; "
        "print(os.environ.get('GLIBC_TUNABLES')); print(sys.argv[1:]); print(sys.flags.dont_write_bytecode)")
GLIBC = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def show(tunables=None):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-B", "-c", SHOW, "out_dir=x", "-m"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(not GLIBC, reason="glibc tunables only")
def test_reexec_adds_the_tunable_and_keeps_arguments_and_interpreter_flags():
    assert show() == ["glibc.malloc.hugetlb=1", "['out_dir=x', '-m']", "1"]
    # The user's own tunables are kept, and theirs for huge pages wins (=0 opts out).
    assert show("glibc.malloc.arena_max=2")[0] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert show("glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0"


@pytest.mark.skipif(not GLIBC, reason="glibc tunables only")
def test_no_reexec_under_a_debugger_with_a_note():
    code = "import sys; sys.settrace(lambda *a: None); " + SHOW
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "None"
    assert "huge-page malloc skipped under a debugger" in proc.stderr
