"""Never lose a run: SIGTERM, damaged checkpoints, NaNs, config changes and disk errors, drilled."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, compose, run_cli
from core import checkpoint, loop, metrics
from core.state import load_run
from data import text
from errors import Diverged, UserError
from tasks import lm

# Run train.py, but have the process signal itself when it builds the batch of step {step}.
SIGNAL_AT_STEP = """
import os, signal, sys
sys.argv = sys.argv[1:]
from data import text
orig = text.train_windows
def train_windows(corpus, seed, step, *a, **k):
    if step == {step}:
        for sig in {signals}:
            os.kill(os.getpid(), getattr(signal, sig))
    return orig(corpus, seed, step, *a, **k)
text.train_windows = train_windows
exec(open("train.py").read())
"""


def train_with_signal_at(step, signals, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = SIGNAL_AT_STEP.format(step=step, signals=list(signals))
    return subprocess.run([sys.executable, "-c", code, "train.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def curve(run_dir, skip=()):
    """The logged values of a run, without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "time_s" and not k.endswith("_per_s")}
            for r in metrics.read(os.path.join(run_dir, "metrics.jsonl")) if r["step"] not in skip]


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
    # A second signal (SIGINT) right after the first only repeats the request: one clean stop.
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
    result = loop.run(compose(base + ["steps=30"]))
    assert result["step"] == 30
    assert os.listdir(os.path.join(out, "unreadable_checkpoints"))  # kept for inspection, out of the way
    for step in checkpoint.manager(out, read_only=True).all_steps():
        _truncate_largest_file(os.path.join(out, "checkpoints", str(step)))
    with pytest.raises(UserError, match="no readable checkpoint.*resume=false"):
        loop.run(compose(base + ["steps=40"]))
    assert loop.run(compose(base + ["steps=10", "resume=false"]))["step"] == 10  # explicit fresh start


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
