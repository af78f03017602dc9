"""CNN and RNN families on the one trainer: they learn, resume exactly, sample, and run end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from conftest import compose, run_cli
from core import metrics
from core.loop import run
from core.sampler import compile_generate
from core.state import load_run, setup
from model import build
from tasks import classify, lm, regress

classify_loss, lm_loss, regress_loss = classify.loss, lm.loss, regress.loss
CNN_TINY = ["model=cnn", "data=images", "task=classify", "model.channels=[4,8]", "model.pool=[true,false]", "model.dense=[16]",
            "batch_size=16", "steps=20", "eval_every=10", "ckpt_every=10", "log_every=5", "eval_batches=4",
            "progress=false", "mesh.data=1", "optim.warmup_steps=2"]
RNN_TINY = ["model=rnn", "model.n_layers=2", "model.d_hidden=16", "data.seq_len=16", "batch_size=8",
            "steps=20", "eval_every=10", "ckpt_every=10", "log_every=5", "eval_batches=2", "progress=false",
            "mesh.data=1", "optim.warmup_steps=2"]


def quadrant_images(path, n=400, size=12, seed=0):
    """A learnable image set: the label is the quadrant holding a bright blob (4 classes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    x = rng.integers(0, 60, size=(n, size, size, 3)).astype(np.uint8)
    h = size // 2
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * h:(r + 1) * h, c * h:(c + 1) * h] += 150
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory, text_file):
    """A tiny RNN char-LM run directory, trained once for the tests that only read it."""
    out = str(tmp_path_factory.mktemp("rnn") / "run")
    assert run(compose(RNN_TINY + [f"data.path={text_file}", f"out_dir={out}"]))["step"] == 20
    return out


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory):
    return quadrant_images(tmp_path_factory.mktemp("img") / "quadrants.npz")


def _overfit(cfg, dims, loss_fn, batch, steps):
    built = setup(cfg, dims, loss_fn)
    runner, state = built.runner, built.fresh_state()
    batch = runner.batch(batch)
    losses = []
    for _ in range(steps):
        state, m = runner.train(state, batch)
        losses.append(float(m["train_loss"]))
    return losses, state, runner.evaluate(state, batch)


FAST = ["optim.lr=1e-2", "optim.min_lr=1e-2", "optim.warmup_steps=0", "optim.weight_decay=0"]


def test_cnn_with_batch_norm_overfits_a_batch_and_keeps_running_statistics():
    cfg = compose(CNN_TINY + FAST + ["model.batch_norm=true"])
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 8, 8, 1)).astype(np.float32), "y": rng.integers(0, 5, 16).astype(np.int32)}
    dims = {"num_classes": 5, "image_shape": [8, 8, 1]}
    losses, state, ev = _overfit(cfg, dims, classify_loss, batch, 60)
    assert losses[0] > 1.2 and losses[-1] < 0.1, (losses[0], losses[-1])
    assert float(ev["accuracy"]) >= 0.9  # eval mode (running statistics) fits the batch too
    # Batch-norm statistics live in `rest` and moved away from their init (mean 0, var 1).
    for stats in state["rest"]["norms"].values():
        assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)
    # Eval uses those running averages: an image's logits do not depend on the rest of its batch;
    # training mode (a key) normalises with the batch's statistics, so there they do.
    model = build(cfg.model, dims, rngs=nnx.Rngs(1))  # fresh: no unit has died yet at lr 1e-2
    x = jnp.asarray(batch["x"]) * 3 + 1
    np.testing.assert_allclose(model(x[:1]), model(x)[:1], atol=1e-5)
    key = jax.random.key(0)
    assert not np.allclose(model(x[:2], key=key)[:1], model(x, key=key)[:1], atol=1e-3)


@pytest.mark.parametrize("cell,kind", [("lstm", "lm"), ("gru", "regress")])
def test_rnn_overfits_a_batch(cell, kind):
    cfg = compose(RNN_TINY + FAST + [f"model.cell={cell}"] + (["data=series", "task=regress"] if kind == "regress" else []))
    rng = np.random.default_rng(0)
    if kind == "lm":
        tokens = rng.integers(0, 12, size=(8, 17)).astype(np.int32)
        batch, dims, loss_fn = {"x": tokens[:, :-1], "y": tokens[:, 1:]}, {"vocab_size": 12}, lm_loss
    else:
        values = rng.normal(size=(8, 17, 1)).astype(np.float32)
        batch, dims, loss_fn = {"x": values[:, :-1], "y": values[:, 1:]}, {"in_features": 1, "out_features": 1}, regress_loss
    losses, _, _ = _overfit(cfg, dims, loss_fn, batch, 80)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def _final(out):
    run_ = load_run(out)
    return run_.state, [r for r in metrics.read(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("family", ["cnn", "rnn"])
def test_resume_equals_uninterrupted_bitwise(family, tmp_path, images_npz, text_file):
    base = (CNN_TINY + ["model.batch_norm=true", "data.augment=true", "model.dropout=0.2", f"data.path={images_npz}"]
            if family == "cnn" else RNN_TINY + ["model.dropout=0.2", f"data.path={text_file}"])
    base += ["optim.decay_steps=20"]  # the schedule must not depend on where the first part stops
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(compose(base + [f"out_dir={whole}"]))
    run(compose(base + [f"out_dir={parts}", "steps=10"]))
    result = run(compose(base + [f"out_dir={parts}"]))
    assert result["step"] == 20
    (a, rows_a), (b, rows_b) = _final(whole), _final(parts)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "time_s"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    if family == "cnn":
        assert any("val_accuracy" in r for r in rows_a)
        assert jax.tree.leaves(a["rest"])  # batch-norm statistics were checkpointed and restored


def test_cifar10_experiment_end_to_end_on_tfds_mock_data(tmp_path):
    out = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=48):
        result = run(compose(["+experiment=cifar10_cnn", f"data.tfds_data_dir={tmp_path}/tfds", f"out_dir={out}",
                              "steps=4", "batch_size=16", "eval_every=4", "progress=false", "mesh.data=1"]))
    assert result["step"] == 4 and np.isfinite(result["val_loss"])
    reloaded = load_run(out)
    assert reloaded.meta["image_shape"] == [32, 32, 3] and reloaded.meta["num_classes"] == 10
    assert [c["kernel"].shape[-1] for c in reloaded.state["params"]["convs"].values()] == [32, 64, 64]
    assert reloaded.model(jnp.zeros((2, 32, 32, 3))).shape == (2, 10)


def test_cnn_learns_real_structure_through_train_py(tmp_path, images_npz):
    out = str(tmp_path / "run")
    proc = run_cli("train.py", *CNN_TINY, f"data.path={images_npz}", f"out_dir={out}", "steps=60", "eval_every=60",
                   "optim.lr=3e-3", "optim.min_lr=3e-3", "eval_batches=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    val = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_accuracy" in r][-1]
    assert val["val_accuracy"] > 0.9, val  # chance is 0.25
    # A classifier does not generate text: sample.py says so in one line.
    sample = run_cli("sample.py", f"out_dir={out}")
    assert sample.returncode == 2 and "does not generate text" in sample.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_scan_sampler_equals_feeding_tokens_one_at_a_time(cell):
    cfg = compose(RNN_TINY + [f"model.cell={cell}"])
    model = build(cfg.model, {"vocab_size": 11}, rngs=nnx.Rngs(3))
    prompt_BP = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    generate = compile_generate(nnx.graphdef(model), max_new_tokens=12, temperature=0.0)
    scanned_BN = np.asarray(generate(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), prompt_BP, jax.random.key(0)))

    carry, tokens, step_logits = model.init_cache(2), [], []
    for t in range(prompt_BP.shape[1]):
        logits_B1V, carry = model(prompt_BP[:, t:t + 1], cache=carry)
        step_logits.append(logits_B1V)
    for _ in range(12):
        token_B = jnp.argmax(logits_B1V[:, -1], axis=-1).astype(jnp.int32)
        tokens.append(token_B)
        logits_B1V, carry = model(token_B[:, None], cache=carry)
        step_logits.append(logits_B1V)
    np.testing.assert_array_equal(scanned_BN, np.stack(tokens, axis=1))
    # One pass over the whole sequence gives the same logits as stepping the carry.
    full_BLV = model(np.concatenate([prompt_BP, scanned_BN], axis=1))
    np.testing.assert_allclose(full_BLV[:, :-1], jnp.concatenate(step_logits, axis=1)[:, :-1], atol=1e-5)


def test_sample_py_generates_from_an_rnn_run(rnn_run):
    proc = run_cli("sample.py", f"out_dir={rnn_run}", "num_samples=2", "max_new_tokens=40", "prompt=The")
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = proc.stdout.rstrip("\n").split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("The") and len(s) == 43 for s in samples)


def test_batch_norm_over_a_sharded_batch_equals_one_device(tmp_path, images_npz):
    """Under jit the batch statistics are the global batch's, whatever the mesh (pmap: per device)."""
    base = [o for o in CNN_TINY if not o.startswith("mesh.")] + ["model.batch_norm=true", f"data.path={images_npz}"]
    one = run(compose(base + ["mesh.data=1", f"out_dir={tmp_path}/one"]))
    four = run(compose(base + ["mesh.data=4", f"out_dir={tmp_path}/four"]))
    assert four["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    stats_one, stats_four = load_run(f"{tmp_path}/one").state["rest"], load_run(f"{tmp_path}/four").state["rest"]
    for a, b in zip(jax.tree.leaves(stats_one), jax.tree.leaves(stats_four), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_another_family_is_refused_in_one_line(rnn_run, text_file):
    from conftest import TINY
    from errors import UserError

    with pytest.raises(UserError, match=r"differs from its checkpoint in .*model\.family.*; restore those values") as e:
        run(compose(TINY + [f"data.path={text_file}", f"out_dir={rnn_run}", "steps=30"]))
    assert "\n" not in str(e.value) and "more" in str(e.value)
    assert load_run(rnn_run).cfg.model.family == "rnn"  # the RNN's checkpoint is untouched
