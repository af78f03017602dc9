"""Never lose a run: SIGTERM, damaged checkpoints, NaNs, config changes and disk errors, drilled."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, compose, curve, devices_env, run_cli
from core import checkpoint, config, loop, metrics
from core.state import load_run
from data import text
from errors import Diverged, UserError
from tasks import lm

# Run train.py, but have the process signal itself when it builds the batch of step {step}, then wait
# there while the file {hold} exists ("": not at all).
SIGNAL_AT_STEP = """
import atexit, os, signal, sys, time
sys.argv = sys.argv[1:]
from data import text
orig = text.train_windows
def train_windows(corpus, seed, step, *a, **k):
    if step == {step}:
        for sig in {signals}:
            os.kill(os.getpid(), getattr(signal, sig))
            atexit.register(os.kill, os.getpid(), getattr(signal, sig))  # and again while the process exits
        while os.path.exists({hold!r}):
            time.sleep(0.05)
    return orig(corpus, seed, step, *a, **k)
text.train_windows = train_windows
exec(open("train.py").read())
"""


def train_with_signal_at(step, signals, *args):
    code = SIGNAL_AT_STEP.format(step=step, signals=list(signals), hold="")
    return subprocess.run([sys.executable, "-c", code, "train.py", *args],
                          cwd=ROOT, env=devices_env(), capture_output=True, text=True, timeout=300)


def assert_same_state(dir_a, dir_b):
    a, b = load_run(str(dir_a)), load_run(str(dir_b))
    assert a.step == b.step
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    """An uninterrupted 24-step run (with dropout, so the RNG stream matters too)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    args = ["+experiment=debug", f"data.path={text_file}", "steps=24", "ckpt_every=8", "eval_every=8",
            "model.dropout=0.1"]
    proc = run_cli("train.py", *args, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, args


def test_sigterm_saves_at_that_step_exits_0_and_resumes_exactly(reference, tmp_path):
    ref_dir, args = reference
    out = tmp_path / "run"
    # The signal lands while step 11 runs (its batch is being built): the run stops once it is done.
    # A second signal (SIGINT) right after the first only repeats the request, and both again while the
    # process exits (atexit, after Python's handlers are gone) change nothing: one clean stop, exit 0.
    proc = train_with_signal_at(11, ["SIGTERM", "SIGINT"], *args, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by SIGTERM at step 12" in proc.stderr and "rerun the same command to resume" in proc.stderr
    assert 12 in checkpoint.manager(str(out), read_only=True).all_steps()
    resumed = run_cli("train.py", *args, f"out_dir={out}")
    assert resumed.returncode == 0 and "resuming from step 12" in resumed.stderr
    assert_same_state(ref_dir, out)
    assert curve(ref_dir, skip={12}) == curve(out, skip={12})  # step 12's extra log line is the stop's


def test_sigkill_then_rerun_equals_uninterrupted(reference, tmp_path):
    ref_dir, args = reference
    out = tmp_path / "run"
    assert train_with_signal_at(19, ["SIGKILL"], *args, f"out_dir={out}").returncode == -signal.SIGKILL
    resumed = run_cli("train.py", *args, f"out_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 16" in resumed.stderr or "resuming from step 8" in resumed.stderr  # 16: if committed
    assert_same_state(ref_dir, out)
    assert curve(ref_dir) == curve(out)  # the lines past step 16 of the killed attempt are gone


def _truncate_largest_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)


def test_damaged_latest_checkpoint_falls_back_with_a_warning_then_all_damaged_is_an_error(tmp_path, text_file):
    out = str(tmp_path / "run")
    base = TINY + [f"data.path={text_file}", f"out_dir={out}", "ckpt_every=10", "eval_every=10"]
    loop.run(compose(base + ["steps=20"]))
    _truncate_largest_file(os.path.join(out, "checkpoints", "20"))
    resumed = run_cli("train.py", *base, "steps=30")  # as a user resumes: one warning, no traceback
    assert resumed.returncode == 0 and "done: step 30" in resumed.stderr, resumed.stderr[-2000:]
    assert "falling back to an earlier one" in resumed.stderr and "Traceback" not in resumed.stderr, resumed.stderr
    assert os.listdir(os.path.join(out, "unreadable_checkpoints"))  # kept for inspection, out of the way
    for step in checkpoint.manager(out, read_only=True).all_steps():
        _truncate_largest_file(os.path.join(out, "checkpoints", str(step)))
    with pytest.raises(UserError, match="no readable checkpoint.*resume=false"):
        loop.run(compose(base + ["steps=40"]))
    assert loop.run(compose(base + ["steps=10", "resume=false"]))["step"] == 10  # explicit fresh start


def test_reloading_a_run_whose_newest_meta_is_damaged_uses_the_one_before(tmp_path, text_file, capsys):
    from core.state import load_run

    out = str(tmp_path / "run")
    loop.run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "ckpt_every=10", "steps=20"]))
    with open(os.path.join(out, "checkpoints", "20", "meta", "metadata"), "r+") as f:
        f.truncate(5)  # sample.py, predict.py, serve.py, export.py and compress.py all reload with load_run
    assert load_run(out).step == 10
    assert "checkpoint step 20" in capsys.readouterr().err
    with pytest.raises(UserError, match="no readable checkpoint .* pass another step="):
        load_run(out, step=20)
    with pytest.raises(UserError, match="config.yaml is a file; pass the directory of a training run"):
        load_run(os.path.join(out, "config.yaml"))


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path):
    from core.runlock import RunLock

    for error, logged in ((MemoryError, False), (UserError, False), (MemoryError, True), (Diverged, True)):
        out = tmp_path / f"{error.__name__}{logged}"
        with pytest.raises(error):
            with RunLock(str(out)):
                (out / "tb").mkdir()
                (out / "config.yaml").write_text("steps: 5\n")
                (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.2}\n' if logged else "")
                raise error("failed at the first step")
        assert out.exists() == logged, error  # logged metrics are kept to look at (a diverged run's too)
    with pytest.raises(MemoryError):  # a run that has a checkpoint, or that existed before, is kept
        with RunLock(str(tmp_path / "saved")):
            (tmp_path / "saved" / "checkpoints" / "10").mkdir(parents=True)
            raise MemoryError
    assert (tmp_path / "saved" / "checkpoints" / "10").is_dir()
    for bad in (["model.n_heads=0"], ["model.mlp_ratio=0"], ["seed=-1"], ["keep_checkpoints=0"],
                ["optim.decay_steps=0"], ["optim.b1=1.5"], ["optim.grad_clip=-1"]):
        with pytest.raises(UserError, match="must be (positive|>= 0|> 0|a positive integer|in)"):
            config.check(compose(TINY + bad))
    with pytest.raises(UserError, match="optim.min_lr=0.1 is above optim.lr=0.01"):
        config.check(compose(TINY + ["optim.lr=0.01", "optim.min_lr=0.1"]))
    with pytest.raises(UserError, match="pass distill.teacher=RUN too"):
        config.check(compose(TINY + ["distill.teacher_step=5"]))


def test_config_changes_between_runs(tmp_path, text_file):
    out = str(tmp_path / "run")
    base = TINY + [f"data.path={text_file}", f"out_dir={out}"]
    loop.run(compose(base + ["steps=10"]))
    with pytest.raises(UserError, match=r"differs from its checkpoint in model\.d_model, model\.n_layers"):
        loop.run(compose(base + ["steps=20", "model.n_layers=3", "model.d_model=32"]))
    other = tmp_path / "other.txt"
    other.write_text("completely different characters 0123456789 " * 50)
    with pytest.raises(UserError, match="differs from its checkpoint in data.path"):
        loop.run(compose(TINY + [f"data.path={other}", f"out_dir={out}", "steps=20"]))
    # Harmless keys (steps, intervals, on_nan) may change.
    assert loop.run(compose(base + ["steps=20", "log_every=2", "on_nan=skip"]))["step"] == 20


def _poison(monkeypatch, at_steps):
    """Batches at `at_steps` carry a marker that makes the loss NaN (a stand-in for a bad batch)."""
    orig_windows, orig_loss = text.train_windows, lm.loss

    def train_windows(corpus, seed, step, *a, **k):
        windows = orig_windows(corpus, seed, step, *a, **k)
        if step in at_steps:
            windows = windows.copy()
            windows[0, 0] = -1
        return windows

    def lm_loss(model, batch, key):
        loss, m = orig_loss(model, jax.tree.map(lambda x: jax.numpy.maximum(x, 0), batch), key)
        loss = loss + jax.numpy.where((batch["x"] < 0).any(), jax.numpy.nan, 0.0)
        return loss, {**m, "loss": loss}

    monkeypatch.setattr(text, "train_windows", train_windows)
    monkeypatch.setattr(lm, "loss", lm_loss)


def test_nan_stops_the_run_naming_the_step_and_last_good_checkpoint(monkeypatch, tmp_path, text_file):
    _poison(monkeypatch, at_steps={12})
    out = str(tmp_path / "run")
    with pytest.raises(Diverged, match=r"at step 13 \(on_nan=stop\); last good checkpoint: step 10"):
        loop.run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=20"]))
    assert checkpoint.manager(out, read_only=True).all_steps() == [10]  # nothing after the NaN was saved


def test_nan_skip_counts_skipped_steps_and_keeps_params_finite(monkeypatch, tmp_path, text_file):
    _poison(monkeypatch, at_steps={3, 12})
    out = str(tmp_path / "run")
    result = loop.run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=20", "on_nan=skip"]))
    assert result["step"] == 20 and np.isfinite(result["val_loss"])
    rows = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "nonfinite_steps" in r]
    assert rows[-1]["nonfinite_steps"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(load_run(out).state["params"]))


def test_unwritable_out_dir_is_a_one_line_error(tmp_path, text_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("train.py", "+experiment=debug", f"data.path={text_file}", f"out_dir={blocker}/run")
    assert proc.returncode == 2 and "cannot write to out_dir" in proc.stderr


def test_failed_checkpoint_write_stops_the_run_and_keeps_earlier_checkpoints(monkeypatch, tmp_path, text_file):
    out = str(tmp_path / "run")
    base = TINY + [f"data.path={text_file}", f"out_dir={out}", "ckpt_every=10"]
    loop.run(compose(base + ["steps=10"]))
    orig = checkpoint.ocp.CheckpointManager.save

    def full_disk(self, step, *a, **k):
        if step == 20:
            raise OSError(28, "No space left on device")
        return orig(self, step, *a, **k)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*free disk space"):
        loop.run(compose(base + ["steps=30"]))
    assert load_run(out).step == 10


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root only): the first checkpoint of a 64-wide debug model does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_an_async_save_is_one_line_and_a_rerun_cleans_up(small_disk, text_file):
    args = ["+experiment=debug", f"data.path={text_file}", "model.d_model=64", "steps=20", f"out_dir={small_disk}/run"]
    proc = run_cli("train.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: writing a checkpoint") and "No space left on device" in lines[-1]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = run_cli("train.py", *args)  # disk freed: the half-written step is cleaned, the run completes
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(os.listdir(small_disk / "run" / "checkpoints")) == ["10", "20"]


def test_a_leftover_orbax_tmp_dir_is_ignored_and_cleaned(trained_run, tmp_path, text_file):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    junk = out / "checkpoints" / "30.orbax-checkpoint-tmp"
    junk.mkdir()
    (junk / "half_written").write_bytes(b"\0" * 100)
    result = loop.run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=30", "eval_every=10",
                                      "ckpt_every=10"]))
    assert result["step"] == 30 and not junk.exists()
    assert checkpoint.manager(str(out), read_only=True).all_steps() == [10, 20, 30]


def test_the_same_command_twice_on_one_out_dir_second_refuses_naming_the_first(tmp_path, text_file):
    args = ["+experiment=debug", f"data.path={text_file}", "steps=40"]
    hold = tmp_path / "hold"  # the first run waits at step 10 while it exists: the second meets it running
    hold.write_text("")
    held = SIGNAL_AT_STEP.format(step=10, signals=[], hold=str(hold))
    first = subprocess.Popen([sys.executable, "-c", held, "train.py", *args, f"out_dir={tmp_path}/run"], cwd=ROOT,
                             env=devices_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # the lock is held from before the first line
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.05)
        second = run_cli("train.py", *args, f"out_dir={tmp_path}/run")
    finally:
        hold.unlink()
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and f"is in use by pid {first.pid} on " in second.stderr
    assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1
    assert first.returncode == 0, err[-2000:]
    solo = run_cli("train.py", *args, f"out_dir={tmp_path}/solo")
    assert solo.returncode == 0 and curve(tmp_path / "run") == curve(tmp_path / "solo")


def test_a_sweep_skips_a_job_another_process_holds(tmp_path, text_file):
    import fcntl

    root = tmp_path / "sweep"
    held = root / "seed=1,steps=4"
    held.mkdir(parents=True)
    with open(held / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on elsewhere\n")
        lock.flush()
        proc = run_cli("train.py", "-m", "+experiment=debug", f"data.path={text_file}", "steps=4", "seed=0,1",
                       f"hydra.sweep.dir={root}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "job skipped: out_dir=" in proc.stderr and "is in use by pid 4242 on elsewhere" in proc.stderr
    assert "1 sweep job(s) skipped, held by another process" in proc.stderr
    assert os.path.isdir(root / "seed=0,steps=4" / "checkpoints" / "4") and os.listdir(held) == [".lock"]


def test_a_sweep_on_tfds_data_offline_exits_promptly_with_its_failed_job_count(tmp_path):
    args = ["-m", "+experiment=debug", "data.tfds_name=tiny_shakespeare", f"data.tfds_data_dir={tmp_path}/tfds",
            "data.download_timeout=5", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"]
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    t0 = time.perf_counter()
    proc = run_cli("train.py", *args, env=offline, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("job failed (error: TFDS dataset 'tiny_shakespeare'") == 2
    assert "2 sweep job(s) failed" in proc.stderr
    assert elapsed < 2 * 5 + 40, elapsed  # two deadlines and start-up; no wait on the download threads at exit


# Run train.py, but send a signal to the process right after the save of step {step} has started
# (the async write in flight).
SIGNAL_IN_SAVE = """
import os, signal, sys
sys.argv = sys.argv[1:]
from core import checkpoint
orig = checkpoint.save
def save(mngr, step, *a, **k):
    orig(mngr, step, *a, **k)
    if step == {step}:
        os.kill(os.getpid(), signal.{signal})
checkpoint.save = save
exec(open("train.py").read())
"""


def tb_scalars(run_dir):
    """Every TensorBoard scalar but the wall-clock ones, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag != "time_s" and not tag.endswith("_per_s")}


def train_with_signal_in_save(step, sig, *args):
    env = devices_env()
    return subprocess.run([sys.executable, "-c", SIGNAL_IN_SAVE.format(step=step, signal=sig), "train.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig, at", [("SIGTERM", 24), ("SIGTERM", 8), ("SIGKILL", 16)],
                         ids=["sigterm-in-final-save", "sigterm-in-save", "sigkill-in-save"])
def test_a_signal_during_a_save_loses_nothing(reference, tmp_path, sig, at):
    ref_dir, args = reference
    out = tmp_path / "run"
    proc = train_with_signal_in_save(at, sig, *args, f"out_dir={out}")
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if at != 24:
        resumed = run_cli("train.py", *args, f"out_dir={out}")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint.manager(str(out), read_only=True).latest_step() == 24
    assert_same_state(ref_dir, out)
    stop_step = {8: {9}, 16: set(), 24: set()}[at]  # a stop logs its own step's line
    assert curve(ref_dir) == curve(out, skip=stop_step)
    ref_tb, tb = tb_scalars(ref_dir), tb_scalars(out)
    assert ref_tb.keys() == tb.keys() and "train_loss" in tb
    for tag in ref_tb:
        assert ref_tb[tag] == [p for p in tb[tag] if p[0] not in stop_step], tag


def test_restore_errors_are_classified_by_what_failed_not_by_their_words(monkeypatch, trained_run, tmp_path,
                                                                         text_file, capsys):
    """A read failure whose message mentions shapes is still a damaged checkpoint (fall back), while
    a checkpoint of other params is a mismatch (refused), whatever the library's wording."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    base = TINY + [f"data.path={text_file}", f"out_dir={out}", "eval_every=10", "ckpt_every=10"]
    orig = checkpoint.ocp.CheckpointManager.restore

    def flaky(self, step, *a, **k):
        if step == 20 and "state" in k["args"].keys():
            raise ValueError("Requested shape (2, 16) does not match the stored array")  # a damaged read
        return orig(self, step, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.ocp.CheckpointManager, "restore", flaky)
        assert loop.run(compose(base + ["steps=30"]))["step"] == 30
    assert "checkpoint step 20" in capsys.readouterr().err  # warned, set aside, resumed from step 10
    import model.transformer as transformer

    mlp_init = transformer.MLP.__init__

    def wider(self, cfg, *, rngs):  # the same config, other shapes behind it: another code version
        mlp_init(self, cfg, rngs=rngs)
        self.fc = transformer.dense_factory(cfg, rngs)(cfg.d_model, cfg.mlp_ratio * cfg.d_model + 1)

    monkeypatch.setattr(transformer.MLP, "__init__", wider)
    with pytest.raises(UserError, match=r"holds other params than this model \(blocks/mlp/fc/bias|"
                                        r"holds other params than this model \(blocks/mlp/fc/kernel"):
        loop.run(compose(base + ["steps=40"]))
