"""Sweeps: Hydra multirun jobs get their own directories, failures are recorded, reruns skip, reports read."""
import csv
import json
import os

import pytest

from conftest import ROOT, devices_env, run_cli
from core import metrics

SWEEP = ["-m", "+experiment=debug", "steps=6", "eval_every=3", "ckpt_every=3", "log_every=3", "eval_batches=1"]


def job_dirs(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, text_file):
    root = str(tmp_path_factory.mktemp("sweep"))
    args = SWEEP + [f"data.path={text_file}", f"hydra.sweep.dir={root}", "optim.lr=1e-3,3e-3", "seed=0,1"]
    first = run_cli("train.py", *args)
    return root, args, first


def test_a_2x2_sweep_gives_four_run_dirs_named_by_their_overrides(sweep):
    root, _, first = sweep
    assert first.returncode == 0, first.stderr[-2000:]
    # Named by the overrides that change training (steps too: a different schedule is a different run).
    assert job_dirs(root) == ["optim.lr=0.001,seed=0,steps=6", "optim.lr=0.001,seed=1,steps=6",
                              "optim.lr=0.003,seed=0,steps=6", "optim.lr=0.003,seed=1,steps=6"]
    curves = {d: [r.get("train_loss") for r in metrics.read(os.path.join(root, d, "metrics.jsonl"))]
              for d in job_dirs(root)}
    assert all(None not in c[:1] for c in curves.values())
    assert len({tuple(c) for c in curves.values()}) == 4  # every job trained its own config


def test_rerunning_the_sweep_skips_finished_jobs(sweep):
    root, args, _ = sweep
    again = run_cli("train.py", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("is already at step 6") == 4 and "done: step" not in again.stderr


def test_jobs_that_differ_in_a_path_get_their_own_directories_and_mistakes_fail_before_any_job(tmp_path, text_file):
    other = tmp_path / "other" / os.path.basename(text_file)  # the same file name in another folder
    other.parent.mkdir()
    other.write_text(open(text_file).read()[::-1])
    root = str(tmp_path / "sweep")
    proc = run_cli("train.py", *SWEEP, "steps=3", f"hydra.sweep.dir={root}", f"data.path={text_file},{other}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    named = f"steps=3,data.path={os.path.basename(text_file)}-"  # and a short hash of each path
    assert len(job_dirs(root)) == 2 and all(d.startswith(named) for d in job_dirs(root)), job_dirs(root)
    assert all(os.path.isdir(os.path.join(root, d, "checkpoints", "3")) for d in job_dirs(root))
    for args, words in ((["seed=0,1", f"out_dir={tmp_path / 'one'}"], "out_dir= names one run"),
                        (["model.n_layer=1,2"], "unknown config key 'model.n_layer'")):
        bad = run_cli("train.py", *SWEEP, f"data.path={text_file}", f"hydra.sweep.dir={tmp_path / 'bad'}", *args)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert sorted(os.listdir(tmp_path)) == ["other", "sweep"]


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path, text_file):
    root = str(tmp_path)
    # d_model=18 with 4 heads is the one invalid combination of the four.
    args = SWEEP + [f"data.path={text_file}", f"hydra.sweep.dir={root}", "model.d_model=16,18", "model.n_heads=2,4"]
    proc = run_cli("train.py", *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 sweep job(s) failed" in proc.stderr
    failed = [d for d in job_dirs(root) if os.path.exists(os.path.join(root, d, "FAILED"))]
    assert failed == ["model.d_model=18,model.n_heads=4,steps=6"]
    assert "not divisible by model.n_heads=4" in open(os.path.join(root, failed[0], "FAILED")).read()
    finished = [d for d in job_dirs(root) if os.path.exists(os.path.join(root, d, "checkpoints", "6"))]
    assert len(finished) == 3


def test_report_ranks_the_runs_and_plots_their_curves(sweep):
    root, _, _ = sweep
    proc = run_cli("report.py", root)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(root, "report.csv")) as f:
        table = list(csv.DictReader(f))
    assert sorted(r["run"] for r in table) == job_dirs(root)
    best = [float(r["best_val_loss"]) for r in table]
    assert best == sorted(best) and all(r["status"] == "done" and r["steps"] == "6" for r in table)
    assert proc.stdout.splitlines()[0].startswith("| run | status | final_val_loss")
    with open(os.path.join(root, "val_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(os.path.join(root, "val_curves.png")) as image:
        assert image.size == (800, 500)
    assert run_cli("report.py", os.path.join(root, "nope")).returncode == 2
    typo = run_cli("report.py", root, "--metric", "val_los", "--out", os.path.join(root, "typo"))
    assert typo.returncode == 2 and "pass --metric one of val_bpb, val_loss" in typo.stderr
    assert not os.path.exists(os.path.join(root, "typo"))
    unwritable = run_cli("report.py", root, "--out", "/proc/no_report")
    assert unwritable.returncode == 2 and len(unwritable.stderr.strip().splitlines()) == 1, unwritable.stderr


def test_report_ranks_higher_is_better_metrics_descending_and_skips_a_torn_line(tmp_path, capsys):
    import report

    for name, r2s in (("a", [-0.5, 0.1]), ("b", [0.3, 0.2]), ("c", [0.05])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"step": 10 * (i + 1), "val_r2": v, "val_loss": 1 - v}) for i, v in enumerate(r2s)]
        lines.append(json.dumps({"step": 25, "val_r2": "n/a", "time_s": "?"}))  # edited by hand: skipped too
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 30, "val_r')  # killed mid-line
    assert report.main([str(tmp_path), "--metric", "val_r2"]) == 0
    with open(tmp_path / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], float(r["best_val_r2"])) for r in table] == [("b", 0.3), ("a", 0.1), ("c", 0.05)]
    assert report.main([str(tmp_path), "--metric", "val_loss", "--mode", "max"]) == 0
    with open(tmp_path / "report.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["a", "c", "b"]  # best (max) losses 1.5, 0.95, 0.8
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        report.main([str(tmp_path), "--metrc", "val_r2"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: unrecognized arguments: --metrc val_r2; `python "
                                                    "report.py --help` lists the options"]


# Run a sweep, but have the second job's process get SIGTERM while it builds the batch of step 3.
SIGTERM_IN_SECOND_JOB = """
import os, signal, sys
sys.argv = sys.argv[1:]
from data import text
orig, jobs = text.train_windows, []
def train_windows(corpus, seed, step, *a, **k):
    if step == 0:
        jobs.append(seed)
    if len(jobs) == 2 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(corpus, seed, step, *a, **k)
text.train_windows = train_windows
exec(open("train.py").read())
"""


def test_a_sweep_killed_part_way_resumes_where_it_stopped(tmp_path, text_file):
    import subprocess
    import sys

    root = str(tmp_path)
    args = SWEEP + [f"data.path={text_file}", f"hydra.sweep.dir={root}", "seed=0,1,2"]
    env = devices_env()
    killed = subprocess.run([sys.executable, "-c", SIGTERM_IN_SECOND_JOB, "train.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 0, killed.stderr[-2000:]
    assert "sweep stopped by SIGTERM; rerun the same command to resume it" in killed.stderr
    assert job_dirs(root) == ["seed=0,steps=6", "seed=1,steps=6"]  # the third job never started
    assert os.path.isdir(os.path.join(root, "seed=1,steps=6", "checkpoints", "4"))
    again = run_cli("train.py", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "seed=0,steps=6 is already at step 6" in again.stderr and "resuming from step 4" in again.stderr
    assert all(os.path.isdir(os.path.join(root, f"seed={i},steps=6", "checkpoints", "6")) for i in range(3))


# A sweep whose seed=1 job crashes once (a transient fault) and whose seed=2 job is stopped by SIGTERM.
FLAKY_SWEEP = """
import os, signal, sys
sys.argv = sys.argv[1:]
from data import text
orig = text.train_windows
def train_windows(corpus, seed, step, *a, **k):
    if seed == 1 and step == 2 and os.path.exists(os.environ["FAIL_ONCE"]):
        os.remove(os.environ["FAIL_ONCE"])
        raise RuntimeError("a transient fault")
    if seed == 2 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(corpus, seed, step, *a, **k)
text.train_windows = train_windows
exec(open("train.py").read())
"""


def test_a_failed_job_is_retried_by_the_rerun_and_every_job_equals_a_standalone_run(tmp_path, text_file):
    import subprocess
    import sys

    from conftest import TINY, compose, curve  # TINY: one device, as the sweep's process has
    from core.loop import run

    root = tmp_path / "sweep"
    args = SWEEP + [f"data.path={text_file}", f"hydra.sweep.dir={root}", "seed=0,1,2"]
    marker = tmp_path / "fail_once"
    marker.write_text("")
    env = devices_env(FAIL_ONCE=str(marker))
    first = subprocess.run([sys.executable, "-c", FLAKY_SWEEP, "train.py", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-2000:]  # one failed job; the stop ends the sweep
    assert "RuntimeError: a transient fault" in open(root / "seed=1,steps=6" / "FAILED").read()
    report = run_cli("report.py", str(root))
    assert report.returncode == 0, report.stderr
    with open(root / "report.csv") as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"seed=0,steps=6": "done", "seed=1,steps=6": "failed", "seed=2,steps=6": "partial"}
    again = run_cli("train.py", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not os.path.exists(root / "seed=1,steps=6" / "FAILED")
    for seed in range(3):
        alone = tmp_path / f"alone{seed}"
        run(compose(TINY + SWEEP[2:] + [f"data.path={text_file}", f"seed={seed}", f"out_dir={alone}"]))
        assert curve(root / f"seed={seed},steps=6", skip={4}) == curve(alone), seed  # 4: the stop's own line
