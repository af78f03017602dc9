"""Knowledge distillation: the loss's two ends, KL falling, the teacher untouched, mistakes."""
import os

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
