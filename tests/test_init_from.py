"""init_from: a new run starts from another run's params (all, or the matching ones), then is a run of its own."""
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import TINY, compose, curve, run_cli
from core import metrics
from core.loop import run
from core.state import load_run
from errors import UserError
from test_families import CNN_TINY, RNN_TINY, quadrant_images
from test_robustness import train_with_signal_at


def val_at(out_dir, step):
    return next(r["val_loss"] for r in metrics.read(os.path.join(out_dir, "metrics.jsonl"))
                if r["step"] == step and "val_loss" in r)


def test_whole_model_init_reproduces_the_source_val_loss_at_step_0(trained_run, tmp_path, text_file):
    out = str(tmp_path / "finetune")
    result = run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", f"init_from={trained_run}", "steps=4",
                                 "eval_every=4", "optim.lr=1e-4"]))
    assert result["step"] == 4
    assert val_at(out, 0) == pytest.approx(val_at(trained_run, 20), abs=1e-6)
    source, new = load_run(trained_run), load_run(out)
    assert new.state["step"] == 4 and int(new.state["opt_state"][1][0].count) == 4  # a fresh optimizer
    assert not np.array_equal(np.asarray(source.state["params"]["wte"]["embedding"]),
                              np.asarray(new.state["params"]["wte"]["embedding"]))  # and it trained on


def test_a_different_head_is_a_one_line_error_or_left_fresh_with_init_from_skip(tmp_path, capsys):
    four = quadrant_images(tmp_path / "four.npz")
    src = str(tmp_path / "src")
    run(compose(CNN_TINY + [f"data.path={four}", f"out_dir={src}", "steps=10"]))
    three = tmp_path / "three.npz"  # the same images, three classes: another head
    with np.load(four) as f:
        np.savez(three, x=f["x"], y=np.minimum(f["y"], 2))
    base = CNN_TINY + [f"data.path={three}", f"init_from={src}", "steps=2"]
    with pytest.raises(UserError, match=r"params differ in shape \(head/bias \(4,\) vs \(3,\), head/kernel .*"
                                        r"init_from_skip=\[head/bias\]") as e:
        run(compose(base + [f"out_dir={tmp_path}/clash"]))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "clash")
    capsys.readouterr()
    run(compose(base + [f"out_dir={tmp_path}/new", "init_from_skip=[head]", "optim.lr=1e-12", "optim.min_lr=0"]))
    logged = capsys.readouterr().err
    assert "loaded 6 of 8 param tensors" in logged and "fresh: head/bias, head/kernel" in logged
    source, new = load_run(src).state["params"], load_run(f"{tmp_path}/new").state["params"]
    np.testing.assert_allclose(np.asarray(new["convs"][0]["kernel"]), np.asarray(source["convs"][0]["kernel"]),
                               atol=1e-6)  # the body came along (lr ~0)
    assert new["head"]["kernel"].shape == (16, 3)


def test_mismatched_sources_are_one_line_errors(trained_run, tmp_path, text_file, capsys):
    base = TINY + [f"data.path={text_file}", "steps=2"]
    with pytest.raises(UserError, match=r"params differ in shape \(blocks/attn/proj/kernel \(2, 16, 16\) vs "):
        run(compose(base + [f"out_dir={tmp_path}/a", f"init_from={trained_run}", "model.d_model=32"]))
    rnn = str(tmp_path / "rnn")
    run(compose(RNN_TINY + [f"data.path={text_file}", f"out_dir={rnn}", "steps=2"]))
    with pytest.raises(UserError, match="holds a model=rnn run, and this run trains model=transformer"):
        run(compose(base + [f"out_dir={tmp_path}/b", f"init_from={rnn}"]))
    with pytest.raises(UserError, match="trained with model.pos_emb=learned; pass model.pos_emb=learned"):
        run(compose(base + [f"out_dir={tmp_path}/f", f"init_from={trained_run}", "model.pos_emb=rope"]))
    with pytest.raises(UserError, match="holds no checkpoints"):
        run(compose(base + [f"out_dir={tmp_path}/c", f"init_from={tmp_path}"]))
    with pytest.raises(UserError, match=r"no checkpoint at step 7; available: \[10, 20\]"):
        run(compose(base + [f"out_dir={tmp_path}/d", f"init_from={trained_run}", "init_from_step=7"]))
    with pytest.raises(UserError, match=r"init_from_skip: haed matches no param of this model; .* such as "):
        run(compose(base + [f"out_dir={tmp_path}/d", f"init_from={trained_run}", "init_from_skip=[haed]"]))
    damaged = tmp_path / "damaged"  # its newest checkpoint's meta cut short: start from the one before
    shutil.copytree(trained_run, damaged)
    with open(damaged / "checkpoints" / "20" / "meta" / "metadata", "r+") as f:
        f.truncate(5)
    run(compose(base + [f"out_dir={tmp_path}/g", f"init_from={damaged}"]))
    assert "init_from " + str(damaged) + " step 10: loaded" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "g")
    other = tmp_path / "other.txt"
    other.write_text("0123456789 abcdefghij\n" * 200)
    with pytest.raises(UserError, match=r"characters '0123456789.*' that the source run's vocabulary \(init_from or distill.teacher\) lacks"):
        run(compose(TINY + [f"data.path={other}", "steps=2", f"out_dir={tmp_path}/e", f"init_from={trained_run}"]))
    assert not any(os.path.exists(tmp_path / d) for d in "abcdefg")


def test_the_new_run_resumes_itself_after_sigkill(trained_run, tmp_path, text_file):
    args = ["+experiment=debug", f"data.path={text_file}", f"init_from={trained_run}", "init_from_step=10",
            "steps=16", "ckpt_every=4", "eval_every=8"]
    whole = tmp_path / "whole"
    assert run_cli("train.py", *args, f"out_dir={whole}").returncode == 0
    killed = tmp_path / "killed"
    assert train_with_signal_at(14, ["SIGKILL"], *args, f"out_dir={killed}").returncode == -9
    resumed = run_cli("train.py", *args, f"out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(init_from is used only by a new run)" in resumed.stderr and "init_from " not in resumed.stderr.split(
        "resuming from step")[1].split("\n")[0].replace("(init_from is used only by a new run)", "")
    a, b = load_run(str(whole)), load_run(str(killed))
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert curve(whole) == curve(killed)


def test_a_char_lm_fine_tunes_on_other_text_with_the_source_vocabulary(trained_run, tmp_path):
    """init_from carries the vocabulary: a text using fewer characters is encoded with the source's."""
    small = tmp_path / "small.txt"
    small.write_text("the king and the queen. " * 200)
    out = str(tmp_path / "tuned")
    run(compose(TINY + [f"data.path={small}", f"out_dir={out}", f"init_from={trained_run}", "steps=2"]))
    assert load_run(out).vocab == load_run(trained_run).vocab
