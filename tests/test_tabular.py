"""Table rows and the MLP: training-only statistics, the split, the baseline, resume, predict.py, bad input."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from conftest import compose, run_cli
from core import metrics
from core.loop import run
from core.state import load_run
from data import tabular
from errors import UserError
from model import mlp
from tasks import regress

# A small MLP on one device, quick to compile on 2 cores.
TAB = ["model=mlp", "data=tabular", "task=regress", "mesh.data=1", "progress=false", "model.hidden=[32,32]",
       "batch_size=16", "eval_batches=50", "log_every=5", "optim.warmup_steps=5"]


def write_csv(path, header, rows, sep=","):
    path.write_text(sep.join(header) + "\n" + "".join(sep.join(str(c) for c in r) + "\n" for r in rows))
    return str(path)


def data_cfg(path, **data):
    return OmegaConf.merge(compose(TAB).data, {"path": str(path), **data})


def sine_table(path, n=600, seed=0):
    """y = sin(3 x1) * x2: no linear model can fit it."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 2))
    y = np.sin(3 * x[:, 0]) * x[:, 1]
    return write_csv(path, ["x1", "x2", "y"], np.c_[x, y].round(5))


def test_the_california_experiment_composes_and_builds_its_model():
    from core.config import check

    cfg = compose(["+experiment=california_mlp"])
    check(cfg)
    assert (cfg.model.family, cfg.data.kind, cfg.task.name, cfg.data.target) == ("mlp", "tabular", "regress",
                                                                                 "median_house_value")
    model = nnx.eval_shape(lambda: mlp.Model(cfg.model, in_features=8, out_features=1, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 100_000
    assert cfg.eval_batches * cfg.batch_size >= 4128  # validation scores all of its rows


def test_classify_on_a_numeric_target_left_on_auto_is_a_one_line_error(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["x", "label"], [[i, i % 2] for i in range(40)])
    with pytest.raises(UserError, match="data.target_kind=classes"):
        run(compose(TAB + ["task=classify", f"data.path={path}", "data.target=label", f"out_dir={tmp_path / 'r'}"]))


def test_statistics_come_from_the_training_split_only(tmp_path):
    x = np.exp(np.arange(100) / 20)  # skewed: every split moves the mean
    path = write_csv(tmp_path / "t.csv", ["a", "b", "y"], np.c_[x + np.arange(100), np.arange(100) % 7, x * 2])
    rows = tabular.load(data_cfg(path, target="y"))
    val = np.array(rows.meta["split"]["val_rows"])
    train = np.setdiff1d(np.arange(100), val)
    a = (x + np.arange(100))[train]
    assert rows.meta["features"][0] == {"name": "a", "mean": pytest.approx(a.mean()), "std": pytest.approx(a.std())}
    assert rows.meta["target_mean"] == [pytest.approx((x * 2)[train].mean())]
    assert rows.meta["target_mean"] != [pytest.approx((x * 2).mean())]  # the full file's would differ
    np.testing.assert_allclose(rows.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(rows.x_train.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(rows.x_val[:, 0], ((x + np.arange(100))[val] - a.mean()) / a.std(), rtol=1e-5)
    assert rows.meta["target_val_var"] == [pytest.approx((x * 2)[val].var())]
    json.dumps(rows.meta)  # JSON types only: it goes into the checkpoint


def test_the_split_is_keyed_on_split_seed_and_partitions_the_rows(tmp_path):
    path = sine_table(tmp_path / "s.csv", n=200)
    a, b = tabular.load(data_cfg(path, target="y")), tabular.load(data_cfg(path, target="y"))
    other = tabular.load(data_cfg(path, target="y", split_seed=1))
    assert a.meta["split"] == b.meta["split"] and len(a.meta["split"]["val_rows"]) == 40
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert a.meta["split"]["val_rows"] != other.meta["split"]["val_rows"]
    assert len(a.x_train) == 160 and len(a.x_val) == 40
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    y_val = table[a.meta["split"]["val_rows"], 2]  # the saved rows are the ones validation scores
    np.testing.assert_allclose(a.y_val[:, 0] * a.meta["target_std"][0] + a.meta["target_mean"][0], y_val, atol=1e-5)


def test_the_baseline_is_numpy_least_squares_scored_on_validation(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 3))
    y = x @ [2.0, -1.0, 0.5] + 10 + rng.normal(size=60)
    train = write_csv(tmp_path / "train.csv", ["a", "b", "c", "y"], np.c_[x, y][:40])
    val = write_csv(tmp_path / "val.csv", ["a", "b", "c", "y"], np.c_[x, y][40:])
    rows = tabular.load(data_cfg(train, target="y", val_path=val))
    w, *_ = np.linalg.lstsq(np.c_[x[:40], np.ones(40)], y[:40], rcond=None)  # raw features: the same fit
    err = np.c_[x[40:], np.ones(20)] @ w - y[40:]
    assert rows.baseline["baseline_rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-4)
    assert rows.baseline["baseline_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-4)
    assert rows.baseline["baseline_r2"] == pytest.approx(1 - (err ** 2).mean() / y[40:].var(), rel=1e-4)


def test_string_columns_are_one_hot_over_the_training_categories(tmp_path):
    train = write_csv(tmp_path / "train.tsv", ["n", "city", "y"], [[i, "ab"[i % 2] if i % 5 else "c", i] for i in range(20)],
                      sep="\t")
    val = write_csv(tmp_path / "val.tsv", ["n", "city", "y"], [[1, "b", 1], [2, "zz", 2], [3, "c", 3]], sep="\t")
    rows = tabular.load(data_cfg(train, target="y", val_path=val))
    assert rows.meta["features"][1] == {"name": "city", "categories": ["a", "b", "c"]}
    assert rows.dims == {"in_features": 4, "out_features": 1}
    np.testing.assert_array_equal(rows.x_val[:, 1:], [[0, 1, 0], [0, 0, 0], [0, 0, 1]])  # unseen "zz": zeros
    assert rows.x_train[:, 1:].sum(1).tolist() == [1.0] * 20


def test_missing_values_are_dropped_and_counted_or_filled_with_the_mean(tmp_path, capsys):
    body = [[i, "" if i % 4 == 0 else i * 2, "inf" if i == 7 else i] for i in range(40)]
    path = write_csv(tmp_path / "m.csv", ["a", "b", "y"], body)
    dropped = tabular.load(data_cfg(path, target="y", val_fraction=0.25))
    assert len(dropped.x_train) + len(dropped.x_val) == 29  # 10 missing b, 1 non-finite target
    assert "dropped" in capsys.readouterr().err
    filled = tabular.load(data_cfg(path, target="y", val_fraction=0.25, missing="mean"))
    assert len(filled.x_train) + len(filled.x_val) == 39  # a missing target still goes
    assert (filled.x_train[:, 1] == 0).sum() >= 1  # a missing b reads as the training mean


def test_classes_from_strings_or_forced_from_numbers_and_regress_refuses_them(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["x", "kind", "num"], [[i, ["pear", "apple", "fig"][i % 3], i % 2] for i in range(30)])
    rows = tabular.load(data_cfg(path, target="kind"))
    assert rows.provides == "classes" and rows.meta["labels"] == ["apple", "fig", "pear"]
    assert rows.dims == {"in_features": 2, "num_classes": 3} and rows.y_train.dtype == np.int32
    numbers = tabular.load(data_cfg(path, target="num", target_kind="classes", features=["x"]))
    assert numbers.meta["labels"] == [0, 1] and numbers.baseline.keys() == {"baseline_accuracy"}
    assert tabular.load(data_cfg(path, target="num", features=["x"])).provides == "values"
    with pytest.raises(UserError, match="data=tabular gives classes here, and task=regress reads values; "
                                        "use task=classify, or data.target_kind=values"):
        run(compose(TAB + [f"data.path={path}", "data.target=kind", f"out_dir={tmp_path / 'r'}"]))
    assert not os.path.exists(tmp_path / "r")


def test_npz_arrays_and_several_targets_in_their_own_units(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = np.c_[x[:, 0], 1000 * x[:, 1]]
    np.savez(tmp_path / "t.npz", x_train=x[:96], y_train=y[:96], x_test=x[96:], y_test=y[96:])
    rows = tabular.load(data_cfg(tmp_path / "t.npz"))
    assert rows.meta["target"] == ["y0", "y1"] and rows.dims == {"in_features": 3, "out_features": 2}
    assert len(rows.x_val) == 24 and rows.meta["target_std"][1] == pytest.approx(1000 * x[:96, 1].std())
    out = str(tmp_path / "run")
    run(compose(TAB + [f"data.path={tmp_path / 't.npz'}", f"out_dir={out}", "steps=10", "eval_every=10"]))
    final = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_loss" in r][-1]
    assert {"val_rmse_y0", "val_rmse_y1", "val_r2", "val_mae_y1"} <= final.keys()
    assert final["val_rmse_y1"] > 100 * final["val_rmse_y0"]  # each in its own units
    assert {"baseline_rmse_y0", "baseline_r2"} <= next(r for r in metrics.read(os.path.join(out, "metrics.jsonl"))).keys()


def test_eval_batches_cover_validation_once_with_padding_masked(tmp_path):
    rows = tabular.load(data_cfg(sine_table(tmp_path / "s.csv", n=100), target="y"))
    count = rows.eval_count(8, 100)
    batches = [rows.eval_batch(i, 8, slice(0, 8)) for i in range(count)]
    assert count == 3 and [n for _, n in batches] == [8, 8, 4]
    assert batches[-1][0]["mask"].tolist() == [1] * 4 + [0] * 4
    np.testing.assert_array_equal(np.concatenate([b["y"][b["mask"] > 0] for b, _ in batches]), rows.y_val)
    half = [rows.train_batch(5, 9, 8, slice(i, i + 4)) for i in (0, 4)]
    np.testing.assert_array_equal(np.concatenate([h["x"] for h in half]), rows.train_batch(5, 9, 8, slice(0, 8))["x"])


def test_quantile_scaling_maps_training_values_to_normal_scores(tmp_path):
    x = np.random.default_rng(0).lognormal(0, 2, 500)  # heavy-tailed
    path = write_csv(tmp_path / "q.csv", ["a", "y"], np.c_[x, x.argsort().argsort() % 3])
    rows = tabular.load(data_cfg(path, target="y", scale="quantile"))
    z = rows.x_train[:, 0]
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.1 and 2.5 < z.max() < 3
    assert np.all(np.diff(z[np.argsort(x[np.setdiff1d(np.arange(500), rows.meta["split"]["val_rows"])])]) >= 0)
    assert len(rows.meta["features"][0]["quantiles"]) == tabular._QUANTILES


def test_mlp_shapes_modes_and_batch_statistics():
    cfg = OmegaConf.merge(compose(TAB).model, {"hidden": [8, 8], "norm": "batch", "residual": True, "dropout": 0.5})
    model = mlp.Model(cfg, in_features=3, out_features=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 3))
    assert model(x).shape == (5, 2)
    before = [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    np.testing.assert_array_equal(model(x), model(x))  # eval: deterministic, statistics untouched
    model(x, key=jax.random.key(1))
    after = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert len(after) == 4 and all(not np.array_equal(a, b) for a, b in zip(before, after))
    images = mlp.Model(cfg, num_classes=4, image_shape=[2, 3, 1], rngs=nnx.Rngs(0))
    assert images(np.zeros((5, 2, 3, 1), np.float32)).shape == (5, 4)
    with pytest.raises(UserError, match="model.norm=group"):
        mlp.check(OmegaConf.merge(cfg, {"norm": "group"}))


def test_finish_reports_errors_in_target_units_and_leaves_series_alone():
    val = {"val_loss": 0.25, "val_abs_err": 0.4}
    out = regress.finish(dict(val), {"target": ["y"], "target_std": [2.0], "target_val_var": [4.0]})
    assert out == {**val, "val_rmse": pytest.approx(1.0), "val_mae": pytest.approx(0.8), "val_r2": pytest.approx(0.75)}
    assert regress.finish(dict(val), {}) == val
    two = regress.finish({"val_loss": 0.5, "val_abs_err": 0.5, "val_sq_err_0": 0.25, "val_abs_err_0": 0.5,
                          "val_sq_err_1": 1.0, "val_abs_err_1": 1.0},
                         {"target": ["a", "b"], "target_std": [1.0, 10.0], "target_val_var": [1.0, 400.0]})
    assert two["val_rmse_b"] == pytest.approx(10.0) and two["val_r2"] == pytest.approx((0.75 + 0.75) / 2)
    # With the evaluated rows' moments (eval_batches may cover part of the split), R² is over those rows:
    # their variance is 0.5 - 0.5**2 = 0.25 scaled units, 1.0 in target units, not the split's 4.0.
    part = regress.finish({**val, "val_y_0": 0.5, "val_y2_0": 0.5},
                          {"target": ["y"], "target_std": [2.0], "target_val_var": [4.0]})
    assert part == {**val, "val_rmse": pytest.approx(1.0), "val_mae": pytest.approx(0.8), "val_r2": pytest.approx(0.0)}


def test_an_mlp_beats_the_linear_baseline_on_a_nonlinear_function(tmp_path):
    path = sine_table(tmp_path / "s.csv", n=1000)
    result = run(compose(TAB + [f"data.path={path}", "data.target=y", f"out_dir={tmp_path / 'run'}",
                                "model.hidden=[64,64]", "batch_size=64", "steps=600", "eval_every=600",
                                "ckpt_every=600", "log_every=100", "steps_per_call=20", "optim.lr=1e-2",
                                "optim.weight_decay=0"]))
    rows = metrics.read(os.path.join(result["out_dir"], "metrics.jsonl"))
    base = next(r for r in rows if "baseline_rmse" in r)
    final = [r for r in rows if "val_rmse" in r][-1]
    assert base["step"] == 0 and final["val_rmse"] < 0.5 * base["baseline_rmse"], (final, base)
    assert final["val_r2"] > 0.8 > base["baseline_r2"]


def test_resume_is_exact_ten_plus_ten_equals_twenty(tmp_path):
    path = sine_table(tmp_path / "s.csv", n=200)
    common = TAB + [f"data.path={path}", "data.target=y", "model.norm=batch", "model.dropout=0.1",
                    "eval_every=10", "ckpt_every=10", "optim.decay_steps=20"]  # the schedule must not hang on steps=
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(compose(common + [f"out_dir={straight}", "steps=20"]))
    run(compose(common + [f"out_dir={split}", "steps=10"]))
    run(compose(common + [f"out_dir={split}", "steps=20"]))
    a, b = load_run(straight), load_run(split)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # params, optimizer, batch statistics
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "rows_per_s")} for r in rows]  # noqa: E731
    assert drop(metrics.read(os.path.join(straight, "metrics.jsonl"))) == drop(metrics.read(os.path.join(split, "metrics.jsonl")))
    assert a.meta["split"] == b.meta["split"] == tabular.load(data_cfg(path, target="y")).meta["split"]


def test_init_from_a_table_run_keeps_its_preprocessing(tmp_path):
    src = str(tmp_path / "src")
    short = ["steps=4", "eval_every=4", "ckpt_every=4", "data.target=y"]
    run(compose(TAB + short + [f"data.path={sine_table(tmp_path / 'a.csv', n=200)}", f"out_dir={src}"]))
    x = np.random.default_rng(1).uniform(5, 9, (100, 2))  # other ranges: fitting anew would move every statistic
    other = write_csv(tmp_path / "b.csv", ["x1", "x2", "y"], np.c_[x, x.sum(1)].round(4))
    out = str(tmp_path / "tuned")
    run(compose(TAB + short + [f"data.path={other}", f"out_dir={out}", f"init_from={src}"]))
    a, b = load_run(src).meta, load_run(out).meta
    assert b["features"] == a["features"] and b["target_std"] == a["target_std"]
    assert b["target_val_var"] != a["target_val_var"]  # the validation rows are the new file's
    with pytest.raises(UserError, match=r"the source run \(init_from or distill.teacher\) predicts y \(values\) from x1, x2"):
        run(compose(TAB + short + [f"data.path={other}", "data.features=[x1]", f"out_dir={tmp_path / 'bad'}",
                                   f"init_from={src}"]))


def test_predict_py_gives_target_units_labels_and_refuses_other_columns(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, (200, 2))
    price = 50_000 + 20_000 * x[:, 0] - 5_000 * x[:, 1]
    kind = np.where(x[:, 0] > 5, "big", "small")
    path = write_csv(tmp_path / "homes.csv", ["rooms", "age", "kind", "price"], np.c_[x.round(3), kind, price.round(1)])
    out = str(tmp_path / "reg")
    run(compose(TAB + [f"data.path={path}", "data.target=price", "data.features=[rooms,age]", f"out_dir={out}",
                       "steps=300", "eval_every=300", "ckpt_every=300", "steps_per_call=20", "optim.lr=1e-2"]))
    done = run_cli("predict.py", f"out_dir={out}", f"path={path}")  # the training file, target column and all
    assert done.returncode == 0, done.stderr[-2000:]
    pred = np.array([json.loads(line)["prediction"] for line in done.stdout.splitlines()])
    assert len(pred) == 200 and np.abs(pred - price).mean() < 0.05 * price.std(), np.abs(pred - price).mean()
    assert "predicting 200 rows" in done.stderr

    cls = str(tmp_path / "cls")
    run(compose(TAB + ["task=classify", f"data.path={path}", "data.target=kind", "data.features=[rooms,age]",
                       f"out_dir={cls}", "steps=100", "eval_every=100", "ckpt_every=100"]))
    rows = write_csv(tmp_path / "new.csv", ["age", "rooms"], [[1, 9.5], [2, 0.5]])  # columns in any order
    labelled = run_cli("predict.py", f"out_dir={cls}", f"path={rows}")
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    first, second = (json.loads(line) for line in labelled.stdout.splitlines())
    assert (first["label"], second["label"]) == ("big", "small")
    assert first["probs"].keys() == {"big", "small"} and sum(first["probs"].values()) == pytest.approx(1.0)
    excel = tmp_path / "excel.csv"  # saved with a byte-order mark, as spreadsheet programs do
    excel.write_text(open(rows).read(), encoding="utf-8-sig")
    with open(excel) as f:
        for source in ([f"path={excel}"], []):  # the file, then stdin
            again = run_cli("predict.py", f"out_dir={cls}", *source, stdin=None if source else f)
            assert again.returncode == 0 and again.stdout == labelled.stdout, again.stderr[-2000:]

    wrong = write_csv(tmp_path / "wrong.csv", ["rooms", "colour"], [[1, "red"]])
    bad = run_cli("predict.py", f"out_dir={out}", f"path={wrong}")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "missing age" in bad.stderr and "not in training colour" in bad.stderr

    # an ensemble reads stdin once and averages in target units; run directories may hold commas
    short = str(tmp_path / "reg,steps=30")
    run(compose(TAB + [f"data.path={path}", "data.target=price", "data.features=[rooms,age]", f"out_dir='{short}'",
                       "steps=30", "eval_every=30", "ckpt_every=30"]))
    alone = run_cli("predict.py", f"out_dir={short}", f"path={path}")
    assert alone.returncode == 0, alone.stderr[-2000:]
    other = np.array([json.loads(line)["prediction"] for line in alone.stdout.splitlines()])
    assert np.abs(other - pred).mean() > 100  # a worse model: the mean below is not either run's
    with open(path) as f:
        both = run_cli("predict.py", f"out_dir={out}", f"out_dir={short}", stdin=f)
    assert both.returncode == 0, both.stderr[-2000:]
    np.testing.assert_allclose([json.loads(line)["prediction"] for line in both.stdout.splitlines()],
                               (pred + other) / 2, rtol=1e-5)
    mixed = run_cli("predict.py", f"out_dir={out}", f"out_dir={cls}", f"path={rows}")
    assert mixed.returncode == 2 and "predict different things" in mixed.stderr, mixed.stderr


def test_predict_py_classifies_images_with_an_mlp(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    x = (rng.integers(0, 50, (64, 4, 4, 1)) + 150 * y[:, None, None, None]).astype(np.uint8)  # bright: class 1
    np.savez(tmp_path / "img.npz", x=x, y=y)
    np.save(tmp_path / "new.npy", x[:6])
    out = str(tmp_path / "img")
    run(compose(["model=mlp", "data=images", "task=classify", "mesh.data=1", "progress=false", "model.hidden=[16]",
                 f"data.path={tmp_path / 'img.npz'}", "batch_size=16", "steps=30", "eval_every=30", "ckpt_every=30",
                 "optim.warmup_steps=0", "optim.lr=1e-2", f"out_dir={out}"]))
    done = run_cli("predict.py", f"out_dir={out}", f"path={tmp_path / 'new.npy'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["label"] for line in done.stdout.splitlines()] == y[:6].tolist()


BAD = [  # (file name, file text or None for no file, data overrides, message)
    ("nope.csv", None, {"target": "y"}, "does not exist"),
    ("", None, {"target": "y"}, "is a directory; pass a CSV"),  # data.path=tmp_path itself
    ("empty.npz", "", {"target": "y"}, "is not a readable .npz file"),
    ("nohead.csv", "1,2,3\n4,5,6\n", {"target": "y"}, "no header line"),
    ("t.csv", "a,b,y\n1,2,3\n", {"target": "price"}, "price is not a column of .*; its columns are a, b, y"),
    ("t.csv", "a,b,y\n1,2,cat\n3,4,dog\n", {"target": "y", "target_kind": "values"}, "holds non-numbers"),
    ("t.csv", "a,b,y\n1,,3\n3,NA,4\n5,?,6\n", {"target": "y"}, "feature column b .* has no values"),
    ("t.csv", "a,y\n1,nan\ninf,2\n3,\n-inf,4\n", {"target": "y"}, "no training row .* is left .* data.missing=mean"),
    ("t.csv", "a,y\n" + "".join(f"{i},{i}\n" for i in range(10)), {"target": "y"}, "fewer than batch_size=16"),
    ("t.csv", "a,y\n1,2\n3,4,5\n", {"target": "y"}, "line 3 has 3 fields and the header 2"),
    ("t.csv", "a,y\n1,2\n3,4\n", {"target": "y", "features": ["a", "zz"]}, "data.features: zz is not a column"),
    ("t.csv", "a,y\n1,2\n3,4\n", {"target": ["y", "y"]}, "data.target names y twice; name each column once"),
    ("t.csv", "a,y\n1,2\n3,4\n", {"target": "y", "val_path": "/nowhere.csv"}, "data.val_path=/nowhere.csv does not"),
    ("t.csv", "id,y\n" + "".join(f"{i},{i}\n" for i in range(1500)) + "".join(f"{i}x,1\n" for i in range(20)),
     {"target": "y"}, r"id holds 1,216 distinct strings.*e.g. '\d+x'"),
]


@pytest.mark.parametrize("name,text,data,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, _, _, m) in enumerate(BAD)])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, name, text, data, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = tmp_path / "run"
    over = [f"data.{k}={v}" if not isinstance(v, list) else f"data.{k}=[{','.join(v)}]" for k, v in data.items()]
    with pytest.raises(UserError, match=message) as e:
        run(compose(TAB + [f"data.path={path}", f"out_dir={out}"] + over))
    assert "\n" not in str(e.value)
    assert not any(os.path.exists(out / f) for f in ("config.yaml", "metrics.jsonl", "checkpoints"))
