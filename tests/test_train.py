"""Training end to end: experiments compose, loss falls, resume is exact, metrics and files are right."""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from conftest import ROOT, TINY, compose, run_cli
from core import metrics
from core.loop import run
from core.checkpoint import peek_meta
from core.config import module
from core.state import load_run, model_bytes, run_dims
from model import build

EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "experiment")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(name):
    cfg = compose([f"+experiment={name}"])
    from core.config import check

    check(cfg)
    dims = {"text": {"vocab_size": 65}, "series": {"in_features": 1, "out_features": 1},
            "tabular": {"in_features": 8, "out_features": 1},
            "text_classify": {"vocab_size": 8000, "num_classes": 2}, "tokens": {"vocab_size": 50257},
            "images": {"num_classes": 10, "image_shape": [28, 28, 1] if "mnist" in name else [32, 32, 3]}}
    assert set(dims) >= {cfg.data.kind}, f"add the dims of data={cfg.data.kind} here"
    task_dims = getattr(module("task", cfg.task.name), "model_dims", lambda d: d)(dims[cfg.data.kind])  # mlm: no head
    model = nnx.eval_shape(lambda: build(cfg.model, task_dims, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params > 0 and cfg.name == name
    header = open(os.path.join(ROOT, "configs", "experiment", f"{name}.yaml")).read().splitlines()
    assert header[1].startswith("# ") and any("Command: python train.py" in h for h in header[:6])


def test_overfitting_one_batch_drives_loss_near_zero(tmp_path):
    from core.state import setup
    from tasks import lm

    cfg = compose(TINY + ["model.d_model=32", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.weight_decay=0",
                          "optim.min_lr=3e-3", "steps=150"])
    built = setup(cfg, {"vocab_size": 16}, lm.loss)
    runner = built.runner
    x = np.random.default_rng(0).integers(0, 16, size=(8, 17)).astype(np.int32)
    batch = runner.batch({"x": x[:, :-1], "y": x[:, 1:]})
    state = built.fresh_state()
    losses = []
    for _ in range(cfg.steps):
        state, m = runner.train(state, batch)
        losses.append(float(m["train_loss"]))
    assert losses[0] > 2.5 and losses[-1] < 0.05, (losses[0], losses[-1])


def test_grad_accumulation_matches_one_big_batch():
    from core.state import setup
    from tasks import lm

    results = []
    for accum in (1, 4):
        built = setup(compose(TINY + [f"optim.grad_accum={accum}"]), {"vocab_size": 16}, lm.loss)
        x = np.random.default_rng(0).integers(0, 16, size=(8, 17)).astype(np.int32)
        batch = built.runner.batch({"x": x[:, :-1], "y": x[:, 1:]})
        state, m = built.runner.train(built.fresh_state(), batch)
        results.append((float(m["train_loss"]), state["params"]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_run_writes_metrics_config_and_resumes_where_it_stopped(tmp_path, text_file):
    out = str(tmp_path / "run")
    overrides = TINY + [f"data.path={text_file}", f"out_dir={out}"]
    first = run(compose(overrides + ["steps=10"]))
    assert first["step"] == 10 and os.path.isfile(os.path.join(out, "config.yaml"))
    rows = metrics.read(os.path.join(out, "metrics.jsonl"))
    assert all("step" in r for r in rows)
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10]
    assert {"lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [10]
    assert os.listdir(os.path.join(out, "tb")), "TensorBoard events missing"

    again = run(compose(overrides + ["steps=10"]))  # a finished run: nothing to do
    assert again["step"] == 10 and len(metrics.read(os.path.join(out, "metrics.jsonl"))) == len(rows)
    more = run(compose(overrides + ["steps=20"]))  # raising steps continues
    rows = metrics.read(os.path.join(out, "metrics.jsonl"))
    assert more["step"] == 20 and [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert load_run(out).step == 20


def test_sample_py_works_from_the_run_directory_alone(tmp_path, text_file):
    out = tmp_path / "run"
    assert run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=10"]))["step"] == 10
    moved = tmp_path / "elsewhere"
    os.rename(out, moved)  # the data file and the original path are not needed
    args = [f"out_dir={moved}", "num_samples=3", "max_new_tokens=40", "temperature=0", "prompt=The"]
    first = run_cli("sample.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    samples = first.stdout.rstrip("\n").split("\n---\n")
    assert len(samples) == 3 and all(s.startswith("The") and len(s) == 43 for s in samples)
    hot = run_cli("sample.py", f"out_dir={moved}", "num_samples=2", "max_new_tokens=60", "temperature=1.5",
                  "seed=1")
    assert hot.returncode == 0 and len(hot.stdout.split("\n---\n")) == 2
    assert "sampling from step 10" in hot.stderr and "sampling" not in hot.stdout  # logs apart from samples
    # A small model samples on one XLA-CPU thread (core/runtime.py); another process on more threads
    # gives the same tokens: greedy sampling is deterministic.
    assert "(XLA-CPU on 1 thread)" in first.stderr
    pool = run_cli("sample.py", *args, "cpu_threads=2")
    assert "(XLA-CPU on 2 threads)" in pool.stderr and pool.stdout == first.stdout
    outside = run_cli("sample.py", f"out_dir={moved}", "prompt='the€'")
    assert outside.returncode == 2 and "characters '€' are not in the model's vocabulary" in outside.stderr


def test_the_checkpoint_meta_is_readable_before_jax_starts_and_sizes_the_model(tmp_path, text_file):
    """sample.py picks its thread count from the meta file and the model's shapes (core/sampler.py)."""
    from core.sampler import cpu_threads_for
    out = tmp_path / "run"
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=4", "ckpt_every=2"]))
    loaded = load_run(out)
    meta = peek_meta(str(out))
    assert meta == loaded.meta and peek_meta(str(out), step=2)["config"] == meta["config"]
    assert peek_meta(str(tmp_path / "nowhere")) is None and peek_meta(str(out), step=3) is None
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(loaded.model)))
    assert model_bytes(loaded.cfg, run_dims(meta)) == params
    cpu, gpu = (compose([f"+experiment={e}"]) for e in ("shakespeare_char_cpu", "shakespeare_char"))
    assert cpu_threads_for(model_bytes(cpu, {"vocab_size": 65})) == 1  # 3.2 MB: one thread
    assert cpu_threads_for(model_bytes(gpu, {"vocab_size": 65})) == 0  # 42 MB: one per core


def test_weight_decay_hits_matrices_only_including_layer_stacked_ones():
    from core.optim import decay_mask

    def mask_of(overrides, dims):
        return decay_mask(nnx.to_pure_dict(nnx.state(build(compose(overrides).model, dims, rngs=nnx.Rngs(0)), nnx.Param)))

    mask = mask_of(TINY, {"vocab_size": 11})
    assert mask["wte"]["embedding"] and mask["blocks"]["attn"]["qkv"]["kernel"] and mask["blocks"]["mlp"]["proj"]["kernel"]
    assert not mask["blocks"]["ln1"]["scale"] and not mask["ln_f"]["scale"]
    rnn = mask_of(["model=rnn"], {"vocab_size": 11})  # stacked by name: w_in_NHG is N matrices, b_in_NG N vectors
    assert rnn["w_in_NHG"] and rnn["w_rec_NHG"] and rnn["embed"]["embedding"] and rnn["head"]["kernel"]
    assert not rnn["b_in_NG"] and not rnn["b_rec_NG"] and not rnn["head"]["bias"]
    bi = mask_of(["model=rnn", "model.bidirectional=true"], {"vocab_size": 11, "num_classes": 2})
    assert all(bi[f"w_{k}_{d}_N{'K' if k == 'in' else 'H'}G"] and not bi[f"b_{k}_{d}_NG"] for k in ("in", "rec") for d in ("fwd", "bwd"))
    cnn = mask_of(["model=cnn", "data=images", "task=classify", "model.batch_norm=true"], {"num_classes": 3, "image_shape": [32, 32, 1]})
    assert cnn["convs"][0]["kernel"] and cnn["dense"][0]["kernel"] and not cnn["norms"][0]["scale"]


def test_several_steps_per_call_follow_the_same_curve_and_land_events_on_their_steps(tmp_path, text_file):
    from core import checkpoint

    base = ["+experiment=debug", f"data.path={text_file}", "log_every=3", "steps=20"]
    one = run(compose(base + ["mesh.data=1", f"out_dir={tmp_path}/one"]))
    many = run(compose(base + ["mesh.data=2", "steps_per_call=4", f"out_dir={tmp_path}/many"]))  # batch sharded too
    rows_one, rows_many = (metrics.read(os.path.join(tmp_path, d, "metrics.jsonl")) for d in ("one", "many"))
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_many]  # logs at 3, 6, 9, 10 (eval), 12...
    for a, b in zip(rows_one, rows_many):
        for k in ("train_loss", "val_loss", "grad_norm"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k)
    assert many["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert checkpoint.manager(str(tmp_path / "many"), read_only=True).all_steps() == [10, 20]


def test_a_run_saved_before_a_key_existed_resumes_while_the_key_keeps_its_default():
    from core import config

    current = OmegaConf.to_container(compose(TINY), resolve=True)
    saved = {k: v for k, v in current.items() if k not in ("prune", "distill")}  # an older checkpoint's config
    saved["model"] = {k: v for k, v in current["model"].items() if k != "quant"}
    harmful, harmless = config.diff(saved, current)
    assert harmful == [] and {"prune.sparsity", "distill.alpha", "model.quant"} <= set(harmless)
    pruning = OmegaConf.to_container(compose(TINY + ["prune.sparsity=0.5"]), resolve=True)
    assert config.diff(saved, pruning)[0] == ["prune.sparsity"]  # not what the old run did: refused


def test_a_finished_run_with_an_unreadable_newest_checkpoint_sets_it_aside(tmp_path, text_file):
    # The finished-run check reads only the newest checkpoint's meta; unreadable, the restore path judges
    out = str(tmp_path / "run")
    base = TINY + [f"data.path={text_file}", f"out_dir={out}", "ckpt_every=10", "eval_every=10"]
    run(compose(base + ["steps=20"]))
    with open(os.path.join(out, "checkpoints", "20", "meta", "metadata"), "w") as f:
        f.write("{not json")
    assert run(compose(base + ["steps=10"]))["step"] == 10
    assert os.listdir(os.path.join(out, "unreadable_checkpoints"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["10"]


def test_a_finished_run_returns_without_its_val_loss_when_metrics_cannot_be_read(tmp_path, text_file):
    out = str(tmp_path / "run")
    base = TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=10", "eval_every=10"]
    assert run(compose(base))["val_loss"] is not None
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 1')  # a line cut short (a full disk)
    assert run(compose(base)) == {"out_dir": out, "step": 10, "val_loss": None, "stopped_by": None}


def test_tensorboard_events_are_on_disk_when_flush_returns(tmp_path):
    """A run SIGKILLed after a checkpoint keeps every event up to it: flush() may not leave any queued."""
    import subprocess
    import sys

    from conftest import devices_env

    code = ("import os, sys; from core.metrics import MetricsLog\n"
            "m = MetricsLog(sys.argv[1], int(sys.argv[2]))\n"
            "for s in range(int(sys.argv[2]) + 1, int(sys.argv[3]) + 1): m.write(s, {'val_loss': s / 10})\n"
            "m.flush(); os._exit(0)  # as a kill right after the checkpoint: no close, no interpreter teardown\n")
    for args in (["0", "5"], ["3", "4"]):  # a run to step 5; then resumed from a checkpoint at step 3
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path), *args], cwd=ROOT, env=devices_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()  # TensorBoard hides the first attempt's step 4 and 5 behind the resumed one's
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val_loss")] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
