"""Gradual magnitude pruning: the schedule, exact zeros through Adam, resume, one-shot + fine-tune, mistakes."""
import os

import jax
import numpy as np
import pytest

from conftest import TINY, compose, run_cli
from core import metrics, prune
from core.loop import run
from core.state import load_run
from errors import UserError

PRUNE = ["prune.sparsity=0.6", "prune.every=5", "prune.end_step=30", "steps=40", "eval_every=5", "ckpt_every=10",
         "optim.decay_steps=40"]  # the LR schedule must not depend on where a first part stops


def kernels(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if jax.tree_util.keystr(p).endswith("['kernel']")}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, text_file):
    out = str(tmp_path_factory.mktemp("pruned") / "run")
    run(compose(TINY + PRUNE + [f"data.path={text_file}", f"out_dir={out}"]))
    return out


def test_sparsity_follows_the_cubic_schedule_and_is_counted_in_the_params(pruned):
    rows = [r for r in metrics.read(os.path.join(pruned, "metrics.jsonl")) if "sparsity" in r]
    for r in rows:  # the masks last changed at the latest multiple of `every` at or before step - 1
        last = min((r["step"] - 1) // 5 * 5, 30) if r["step"] > 0 else None
        expected = 0.0 if last is None else float(prune.schedule(last, 0, 30, 0.6))
        assert r["sparsity"] == pytest.approx(expected, abs=2e-3), r
    assert rows[-1]["step"] == 40 and rows[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert [r["sparsity"] for r in rows] == sorted(r["sparsity"] for r in rows)  # never un-prunes


def test_the_final_checkpoint_is_sparse_where_its_masks_say_and_nowhere_else(pruned):
    state = load_run(pruned).state
    zeros = sum(int((k == 0).sum()) for k in kernels(state["params"]).values())
    total = sum(k.size for k in kernels(state["params"]).values())
    assert zeros / total == pytest.approx(0.6, abs=1e-3)
    for (path, x), m in zip(jax.tree_util.tree_flatten_with_path(state["params"])[0], jax.tree.leaves(state["masks"])):
        x, m = np.asarray(x), np.asarray(m)
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            assert not x[~m].any() and x[m].all()  # pruned weights exactly 0; kept ones not (Adam moved them)
        else:
            assert m.shape == () and m  # embeddings, norms: not pruned


def test_resume_keeps_the_masks_and_equals_uninterrupted(pruned, tmp_path, text_file):
    parts = str(tmp_path / "parts")
    run(compose(TINY + PRUNE + [f"data.path={text_file}", f"out_dir={parts}", "steps=30"]))  # stops mid-run
    run(compose(TINY + PRUNE + [f"data.path={text_file}", f"out_dir={parts}"]))
    a, b = load_run(pruned).state, load_run(parts).state
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layer_scope_prunes_each_layer_of_a_stacked_tensor_alike(tmp_path, text_file):
    out = str(tmp_path / "layer")
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=4", "prune.sparsity=0.5",
                        "prune.scope=layer", "prune.start_step=0", "prune.end_step=0"]))
    for path, k in kernels(load_run(out).state["params"]).items():
        for layer in k:  # stacked blocks: one (D, F) slice per layer, each half zeros
            assert (layer == 0).mean() == pytest.approx(0.5, abs=1.0 / layer.size), path


def test_one_shot_pruning_of_a_finished_run_then_fine_tuning(trained_run, tmp_path, text_file):
    out = str(tmp_path / "tuned")
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", f"init_from={trained_run}", "steps=6",
                        "eval_every=3", "prune.sparsity=0.5", "prune.start_step=0", "prune.end_step=0"]))
    rows = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "sparsity" in r]
    assert [r["step"] for r in rows] == [0, 3, 6] and rows[0]["sparsity"] == 0.0  # step 0: the source as loaded
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-3) for r in rows[1:])
    source, tuned = kernels(load_run(trained_run).state["params"]), kernels(load_run(out).state["params"])
    for path, k in tuned.items():  # the smallest of the source's weights went, the kept ones trained on
        gone = k == 0
        assert np.abs(source[path][gone]).max() <= np.abs(source[path][~gone]).max()


@pytest.mark.parametrize("override,message", [
    (["prune.sparsity=1.0"], "prune.sparsity=1.0 must be in [0, 1)"),
    (["prune.sparsity=-0.1"], "must be in [0, 1)"),
    (["prune.sparsity=0.5", "prune.end_step=99"], "end_step <= steps=20"),
    (["prune.sparsity=0.5", "prune.scope=row"], "prune.scope=row"),
    (["prune.sparsity=0.5", "prune.tensors=[nothing_like_this]"], "matches no parameter"),
])
def test_pruning_mistakes_are_one_line_errors(override, message, tmp_path, text_file):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run(compose(TINY + [f"data.path={text_file}", f"out_dir={tmp_path / 'r'}"] + override))


def test_the_cli_refuses_a_bad_sparsity_in_one_line(tmp_path):
    out = run_cli("train.py", *TINY, f"out_dir={tmp_path / 'r'}", "prune.sparsity=2")
    assert out.returncode == 2 and "prune.sparsity=2.0 must be in [0, 1)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "r")
