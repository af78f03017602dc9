"""Knowledge distillation: the loss's two ends, KL falling, the teacher untouched, mistakes."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, compose, make_text, run_cli
from core import distill, metrics
from core.loop import run
from core.state import load_run
from errors import UserError
from model import build
from tasks import classify, lm

STUDENT = ["model.d_model=8", "model.n_heads=2", "model.n_layers=1"]


def tiny_lm(seed, width):
    cfg = compose(TINY + [f"model.d_model={width}"]).model
    return build(cfg, {"vocab_size": 20}, rngs=nnx.Rngs(seed))


def test_alpha_0_is_the_task_loss_and_alpha_1_the_scaled_kl():
    student, teacher = tiny_lm(0, 8), tiny_lm(1, 16)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.integers(0, 20, (4, 16)), jnp.int32),
             "y": jnp.asarray(rng.integers(0, 20, (4, 16)), jnp.int32)}
    task_loss = lm.loss(student, batch, None)[0]
    loss0, m0 = distill.distill_loss(lm.outputs, 0.0, 2.0)(student, batch, None, teacher)
    np.testing.assert_allclose(loss0, task_loss, rtol=1e-6)
    loss1, m1 = distill.distill_loss(lm.outputs, 1.0, 2.0)(student, batch, None, teacher)
    np.testing.assert_allclose(loss1, 4.0 * m1["kl"], rtol=1e-6)  # T^2 = 4
    same = distill.distill_loss(lm.outputs, 1.0, 2.0)(student, batch, None, student)[1]["kl"]
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(m1["kl"]) > 1e-4

    logits = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    picks = {"x": jnp.zeros((5, 2)), "y": jnp.array([0, 1, 2, 0, 1]), "mask": jnp.array([1.0, 1, 1, 0, 0])}
    model = lambda x, key=None: logits  # noqa: E731 - a classifier whose logits are given
    hard, _ = distill.distill_loss(classify.outputs, 0.0, 1.0)(model, picks, None, model)
    np.testing.assert_allclose(hard, classify.loss(model, picks, None)[0], rtol=1e-6)  # padding rows weigh 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, text_file):
    out = str(tmp_path_factory.mktemp("teacher") / "run")
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=40", "eval_every=20", "ckpt_every=20"]))
    return out


def test_pure_distillation_lowers_the_kl_and_leaves_the_teacher_alone(teacher, tmp_path, text_file):
    before = jax.tree.map(np.asarray, load_run(teacher).state["params"])
    out = str(tmp_path / "student")
    run(compose(TINY + STUDENT + [f"data.path={text_file}", f"out_dir={out}", "steps=30", "log_every=5",
                                  f"distill.teacher={teacher}", "distill.alpha=1.0", "optim.lr=3e-3"]))
    kl = [r["train_kl"] for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "train_kl" in r]
    assert len(kl) == 6 and kl[-1] < 0.7 * kl[0]
    after = load_run(teacher).state["params"]
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    student = load_run(out)  # a plain run: the teacher is not in its checkpoint
    assert student.cfg.distill.teacher == teacher and "teacher" not in student.state
    assert student.model.wte.embedding.shape == (32, 8)


def test_distillation_runs_under_pmap_and_resumes(teacher, tmp_path, text_file):
    out = str(tmp_path / "pmap")
    base = TINY[:1] + STUDENT + [f"data.path={text_file}", f"out_dir={out}", f"distill.teacher={teacher}",
                                 "parallel=pmap", "mesh.data=2", "steps_per_call=2", "optim.decay_steps=8"]
    run(compose(base + ["steps=4", "ckpt_every=4"]))
    assert run(compose(base + ["steps=8"]))["step"] == 8


def test_a_teacher_of_another_vocabulary_task_or_without_checkpoints_is_a_one_line_error(teacher, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=3).upper())  # other characters: another vocabulary
    base = TINY + STUDENT + [f"out_dir={tmp_path / 's'}"]
    with pytest.raises(UserError, match="vocabulary"):  # the student reads the teacher's vocab: unknown chars
        run(compose(base + [f"data.path={other}", f"distill.teacher={teacher}"]))
    with pytest.raises(UserError, match="holds no checkpoint"):
        run(compose(base + [f"data.path={other}", f"distill.teacher={tmp_path}"]))
    series = ["model=rnn", "data=series", "task=regress", "model.d_hidden=8", "steps=2", "mesh.data=1",
              f"out_dir={tmp_path / 'r'}", f"distill.teacher={teacher}"]
    with pytest.raises(UserError, match="trained for task=lm; this run trains task=regress"):
        run(compose(series))
    out = run_cli("train.py", *base, f"data.path={other}", "distill.teacher=/nonexistent", "distill.alpha=2")
    assert out.returncode == 2 and "distill.alpha=2.0 must be in [0, 1]" in out.stderr


def test_a_cnn_student_distils_from_a_cnn_teacher_and_classes_must_match(tmp_path):
    from test_families import CNN_TINY, quadrant_images

    images = quadrant_images(tmp_path / "q.npz")
    teacher = str(tmp_path / "teacher")
    run(compose(CNN_TINY + [f"data.path={images}", f"out_dir={teacher}", "steps=10"]))
    student = str(tmp_path / "student")
    run(compose(CNN_TINY + [f"data.path={images}", f"out_dir={student}", "steps=10", "model.channels=[2,4]",
                            f"distill.teacher={teacher}"]))
    rows = metrics.read(os.path.join(student, "metrics.jsonl"))
    assert all(k in rows[-2] for k in ("train_kl", "train_task_loss")) and "val_accuracy" in rows[-1]
    fewer = tmp_path / "three.npz"
    data = dict(np.load(images))
    np.savez(fewer, x=data["x"], y=data["y"] % 3)  # three classes where the teacher knows four
    with pytest.raises(UserError, match="class count|labels"):
        run(compose(CNN_TINY + [f"data.path={fewer}", f"out_dir={tmp_path / 's3'}", f"distill.teacher={teacher}"]))


def test_augment_adds_the_teachers_soft_term_on_a_masked_copy_drawn_from_the_key():
    from model.wordpiece_ids import CLS_ID, FIRST_WORD_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
    rng = np.random.default_rng(0)
    w_VY = jnp.asarray(rng.normal(size=(40, 3)), jnp.float32)
    read = []

    def student(x, key=None):  # a bag-of-word-pieces classifier that records what it reads
        read.append(np.asarray(x))
        return w_VY[x].sum(1)

    teacher = lambda x, key=None: (w_VY[x] ** 2).sum(1)  # noqa: E731
    x_BL = np.full((64, 12), PAD_ID)
    x_BL[:, 0] = CLS_ID
    for b in range(64):
        n = rng.integers(3, 10)
        x_BL[b, 1:n + 1] = rng.integers(FIRST_WORD_ID, 40, n)
        x_BL[b, n + 1] = SEP_ID
    batch = {"x": jnp.asarray(x_BL, jnp.int32), "y": jnp.asarray(rng.integers(0, 3, 64))}
    key = jax.random.key(0)
    plain_loss, plain = distill.distill_loss(classify.outputs, 0.5, 2.0)(student, batch, key, teacher)
    assert "kl_augmented" not in plain
    read.clear()
    loss, m = distill.distill_loss(classify.outputs, 0.5, 2.0, augment=0.3)(student, batch, key, teacher)
    assert len(read) == 2 and (read[0] == x_BL).all()  # the batch, then its masked copy
    masked_BL = read[1]
    words_BL = x_BL >= FIRST_WORD_ID
    assert (masked_BL[~words_BL] == x_BL[~words_BL]).all()  # [PAD] [CLS] [SEP] are never masked
    hit_BL = masked_BL != x_BL
    assert (masked_BL[hit_BL] == MASK_ID).all() and 0.25 < hit_BL.sum() / words_BL.sum() < 0.35
    assert float(m["kl_augmented"]) > 0 and float(m["kl"]) == pytest.approx(float(plain["kl"]), rel=1e-6)
    np.testing.assert_allclose(loss, plain_loss + 0.5 * 4.0 * m["kl_augmented"], rtol=1e-6)
    again = distill.distill_loss(classify.outputs, 0.5, 2.0, augment=0.3)(student, batch, key, teacher)[0]
    assert float(again) == float(loss) and (read[3] == masked_BL).all()  # a pure function of the key
    read.clear()
    distill.distill_loss(classify.outputs, 0.5, 2.0, augment=0.3, augment_by="unk")(
        student, batch, jax.random.key(1), teacher)
    assert set(np.unique(read[1][read[1] != x_BL])) == {UNK_ID} and not (read[1] == masked_BL).all()
    read.clear()
    distill.distill_loss(classify.outputs, 0.5, 2.0, augment=0.3, augment_by="delete")(student, batch, key, teacher)
    for row, short in zip(x_BL, read[1], strict=True):  # the same row, some words gone, [PAD] after [SEP]
        kept = short[short != PAD_ID]
        assert kept[0] == CLS_ID and kept[-1] == SEP_ID and (short[len(kept):] == PAD_ID).all()
        it = iter(row[row != PAD_ID])
        assert all(t in it for t in kept)  # a subsequence, in order
    deleted = (x_BL != PAD_ID).sum() - (read[1] != PAD_ID).sum()
    assert 0.25 < deleted / words_BL.sum() < 0.35
    read.clear()
    assert "kl_augmented" not in distill.distill_loss(classify.outputs, 0.5, 2.0, augment=0.3)(
        student, batch, None, teacher)[1] and len(read) == 1  # no key (evaluation): the batch alone


def test_augment_outside_a_text_classifier_or_out_of_range_is_a_one_line_error(tmp_path, text_file):
    base = TINY + STUDENT + [f"data.path={text_file}", f"out_dir={tmp_path / 's'}", "distill.teacher=/nonexistent"]
    for extra, message in (("distill.augment=0.1", "alters the words of texts to classify; this run trains "
                                                   "task=lm on text: drop distill.augment"),
                           ("distill.augment=1.0", "distill.augment=1.0 must be in [0, 1)"),
                           ("distill.augment_by=pad", "distill.augment_by=pad must be mask, unk, delete")):
        with pytest.raises(UserError, match=re.escape(message)):
            run(compose(base + [extra]))
    assert not (tmp_path / "s").exists()


def test_an_ensemble_of_teachers_is_distilled_through_its_mean_probability():
    student, a, b = tiny_lm(0, 8), tiny_lm(1, 16), tiny_lm(2, 8)
    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.integers(0, 20, (2, 16)), jnp.int32),
             "y": jnp.asarray(rng.integers(0, 20, (2, 16)), jnp.int32)}
    loss = distill.distill_loss(lm.outputs, 1.0, 2.0)
    one, twice = loss(student, batch, None, a)[1]["kl"], loss(student, batch, None, (a, a))[1]["kl"]
    np.testing.assert_allclose(twice, one, rtol=1e-5)  # an ensemble of one run is that run
    kl = loss(student, batch, None, (a, b))[1]["kl"]
    p_NV = np.mean([jax.nn.softmax(np.asarray(m(batch["x"]), np.float64).reshape(-1, 20) / 2.0) for m in (a, b)], 0)
    s_NV = jax.nn.log_softmax(np.asarray(student(batch["x"]), np.float64).reshape(-1, 20) / 2.0)
    np.testing.assert_allclose(kl, (p_NV * (np.log(p_NV) - s_NV)).sum(-1).mean(), rtol=1e-4)
    assert not np.isclose(kl, one, rtol=1e-3) and not np.isclose(kl, loss(student, batch, None, b)[1]["kl"], rtol=1e-3)


def test_a_student_distils_from_a_list_of_runs_which_must_read_the_same_tokens(teacher, tmp_path, text_file):
    second = str(tmp_path / "second")
    run(compose(TINY + STUDENT + [f"data.path={text_file}", f"out_dir={second}", "steps=10"]))
    first_kl = {}
    for name, teachers in (("one", teacher), ("twice", f"[{teacher},{teacher}]"), ("both", f"[{teacher},{second}]")):
        out = str(tmp_path / name)
        run(compose(TINY + STUDENT + [f"data.path={text_file}", f"out_dir={out}", "steps=1", "log_every=1",
                                      f"distill.teacher={teachers}"]))
        first_kl[name] = metrics.read(os.path.join(out, "metrics.jsonl"))[0]["train_kl"]
    assert first_kl["twice"] == pytest.approx(first_kl["one"], rel=1e-5)  # the same student, the same batch
    assert first_kl["both"] != pytest.approx(first_kl["one"], rel=1e-3)  # the second teacher is read
    assert load_run(str(tmp_path / "both")).cfg.distill.teacher[1] == second
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=3).upper())
    upper = str(tmp_path / "upper")
    run(compose(TINY + STUDENT + [f"data.path={other}", f"out_dir={upper}", "steps=2"]))
    proc = run_cli("train.py", *TINY, *STUDENT, f"data.path={text_file}", f"out_dir={tmp_path / 's2'}",
                   f"distill.teacher=[{teacher},{upper}]")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"distill.teacher: {upper} was trained on other data than {teacher} (dims, vocab)" in proc.stderr
    assert not (tmp_path / "s2").exists()
    proc = run_cli("train.py", *TINY, *STUDENT, f"data.path={text_file}", "distill.teacher=2024")
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr, proc.stderr  # a number is a path
    proc = run_cli("train.py", *TINY, *STUDENT, f"data.path={text_file}", "distill.teacher={a:1}")
    assert proc.returncode == 2 and "must be a run directory or a list of them" in proc.stderr, proc.stderr
