"""train.py, sample.py and the benchmarks re-execute themselves once with huge-page malloc (core/hugepages.py)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHOW = ("from core.hugepages import use_huge_pages; use_huge_pages(); import os, sys; "
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


def test_every_entry_point_asks_for_huge_pages_before_importing_jax():
    for script in ("train.py", "sample.py", os.path.join("benchmarks", "run.py")):
        with open(os.path.join(ROOT, script)) as f:
            source = f.read()
        assert "use_huge_pages()" in source, script
        assert source.index("use_huge_pages()") < source.index("import jax" if "import jax" in source else "import hydra")
