"""Every task end to end through train.py as a user runs it: metrics schema, last-step eval, checkpoint."""
import os

import pytest

from conftest import run_cli
from core import checkpoint, metrics
from core.state import load_run
from test_families import CNN_TINY, RNN_TINY, quadrant_images

SHORT = ["steps=6", "eval_every=3", "ckpt_every=3", "log_every=3", "eval_batches=2"]
CASES = {
    # overrides, task, throughput key, the task's own metrics (logged as train_* and val_*)
    "lm-transformer": (["+experiment=debug", "data.path=TEXT"], "lm", "tokens_per_s", set()),
    "lm-lstm": (RNN_TINY + ["data.path=TEXT"], "lm", "tokens_per_s", set()),
    "classify-cnn": (CNN_TINY + ["data.path=IMAGES"], "classify", "images_per_s", {"accuracy"}),
    "regress-gru": (RNN_TINY + ["model.cell=gru", "data=series", "task=regress"], "regress", "values_per_s",
                    {"abs_err"}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_task_trains_logs_evaluates_and_checkpoints(case, tmp_path, text_file):
    overrides, task, rate, own = CASES[case]
    files = {"TEXT": text_file, "IMAGES": quadrant_images(tmp_path / "q.npz") if "IMAGES" in str(overrides) else ""}
    args = [o.replace("TEXT", files["TEXT"]).replace("IMAGES", files["IMAGES"]) for o in overrides]
    out = tmp_path / "run"
    proc = run_cli("train.py", *args, *SHORT, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics.read(os.path.join(out, "metrics.jsonl"))
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == [3, 6] and [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert set(r) == {"step", "train_loss", "lr", "grad_norm", "nonfinite_steps", rate, "time_s"} | {
            f"train_{k}" for k in own}, r
        assert r[rate] > 0 and r["nonfinite_steps"] == 0
    for r in evals:
        bpb = {"val_bpb"} if task == "lm" else set()  # bits per byte: LM runs only (tasks/lm.py)
        f1 = {"val_f1"} if task == "classify" else set()  # macro F1: more than two classes (4 quadrants)
        assert set(r) == {"step", "val_loss", "time_s"} | {f"val_{k}" for k in own} | bpb | f1, r
    assert checkpoint.manager(str(out), read_only=True).all_steps() == [3, 6]
    reloaded = load_run(str(out))
    assert reloaded.task == task and reloaded.step == 6 and reloaded.cfg.task.name == task
    assert os.path.isfile(out / "config.yaml") and os.listdir(out / "tb")
