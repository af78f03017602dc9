"""export.py: every family's outputs (and an LM's decode loop) reproduced by jax + numpy alone, or TF alone."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, compose, devices_env, run_cli
from core import export
from core.loop import run
from core.state import load_run
from errors import UserError

# Two steps of each family: the weights need not be good, only the checkpoint's.
QUICK = ["steps=2", "eval_every=2", "ckpt_every=2", "eval_batches=1", "log_every=1", "progress=false", "mesh.data=1",
         "optim.warmup_steps=1"]
FAMILIES = {  # name -> overrides (the transformer is conftest's trained_run)
    "rnn_lm": ["model=rnn", "model.n_layers=2", "model.d_hidden=16", "data.seq_len=16", "batch_size=8"],
    "rnn_series": ["model=rnn", "model.cell=gru", "model.n_layers=1", "model.d_hidden=8", "data=series", "task=regress",
                   "data.seq_len=8", "batch_size=8"],
    "cnn": ["model=cnn", "data=images", "task=classify", "model.channels=[4,8]", "model.pool=[true,false]",
            "model.dense=[16]", "model.batch_norm=true", "batch_size=16"],
    "mlp": ["model=mlp", "data=tabular", "task=regress", "model.hidden=[8]", "model.norm=batch", "batch_size=16",
            "data.target=y"],
    "encoder": ["model=encoder", "data=text_classify", "task=classify", "model.n_layers=2", "model.n_heads=2",
                "model.d_model=16", "data.seq_len=12", "data.vocab_size=60", "batch_size=16"],
}
FORMATS = ("stablehlo", "savedmodel")

# What an outside user runs: this script imports jax and numpy (or tensorflow and numpy) and nothing of ours.
# It feeds each export B x L example inputs and, for an LM, runs a decode loop: a prompt, then greedy tokens.
RELOAD = r'''
import json, sys
import numpy as np

fmt, out, dests = sys.argv[1], sys.argv[2], sys.argv[3:]
if fmt == "savedmodel":  # TF alone: importing JAX (keras would try) fails here
    sys.modules.update(jax=None, jaxlib=None)
B, L, PROMPT, STEPS = 3, 5, 2, 4
results = {}
for n, dest in enumerate(dests):
    sig = json.load(open(f"{dest}/signature.json"))
    rng = np.random.default_rng(n)
    if fmt == "stablehlo":
        import jax
        params = dict(np.load(f"{dest}/params.npz"))
        def call(name, *args):
            exported = jax.export.deserialize(open(f"{dest}/{sig[name]['file']}", "rb").read())
            return jax.tree.map(np.asarray, exported.call(params, *args))
        cache_specs = sig.get("decode", {"inputs": [{"list": []}]})["inputs"][0]["list"]
    else:
        import tensorflow as tf
        model = tf.saved_model.load(dest)
        def call(name, *args):
            flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
            outs = model.signatures[sig[name]["signature"]](
                **{s["name"]: tf.constant(a) for s, a in zip(sig[name]["inputs"], flat)})
            outs = [outs[s["name"]].numpy() for s in sig[name]["outputs"]]
            return outs[0] if len(outs) == 1 else (outs[0], outs[1:])
        cache_specs = [s for s in sig.get("decode", {"inputs": []})["inputs"] if s["name"].startswith("cache_")]
    spec = sig["forward"]["inputs"][0]
    shape = [{"B": B, "L": L}.get(d, d) for d in spec["shape"]]
    x = rng.integers(1, 5, shape).astype(np.int32) if spec["dtype"] == "int32" else \
        rng.standard_normal(shape).astype(spec["dtype"])
    results[f"{n}/x"], results[f"{n}/forward"] = x, call("forward", x)
    if "decode" in sig:
        cache = [np.zeros([B if d == "B" else d for d in c["shape"]], c["dtype"]) for c in cache_specs]
        seq = x[:, :PROMPT]
        logits, cache = call("decode", cache, seq, np.int32(0))
        steps = [logits[:, -1]]
        for pos in range(PROMPT, PROMPT + STEPS):
            seq = np.concatenate([seq, steps[-1].argmax(-1).astype(np.int32)[:, None]], axis=1)
            logits, cache = call("decode", cache, seq[:, -1:], np.int32(pos))
            steps.append(logits[:, -1])
        results[f"{n}/seq"], results[f"{n}/decode"] = seq, np.stack(steps, axis=1)
np.savez(out, **results)
ours = {"flax", "core", "model", "data", "orbax", "optax", "hydra", "omegaconf"}
if fmt == "savedmodel":
    ours.add("jax")
loaded = sorted(m for m in ours if sys.modules.get(m) is not None)
assert not loaded, f"imported {loaded}"
'''


def write_inputs(d):
    """Images, a table and sentences, each small."""
    rng = np.random.default_rng(0)
    np.savez(d / "images.npz", x=rng.integers(0, 255, (48, 8, 8, 3)).astype(np.uint8), y=np.arange(48) % 3)
    x = rng.uniform(-1, 1, (64, 2))
    (d / "table.csv").write_text("x1,x2,city,y\n" + "".join(f"{a:.4f},{b:.4f},{'abc'[i % 3]},{a * b:.4f}\n"
                                                            for i, (a, b) in enumerate(x)))
    words = "the film was good bad very dull fine and plot".split()
    (d / "s.tsv").write_text("sentence\tlabel\n" + "".join(
        " ".join(rng.choice(words, rng.integers(2, 8))) + f"\t{i % 2}\n" for i in range(64)))
    return {"cnn": f"data.path={d / 'images.npz'}", "mlp": f"data.path={d / 'table.csv'}",
            "encoder": f"data.path={d / 's.tsv'}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run, text_file):
    """A run directory of every family: conftest's tiny transformer LM and a 2-step run of each other."""
    d = tmp_path_factory.mktemp("export_runs")
    paths = write_inputs(d) | {"rnn_lm": f"data.path={text_file}"}
    out = {"transformer": trained_run}
    for name, overrides in FAMILIES.items():
        out[name] = str(d / name)
        run(compose(overrides + QUICK + [f"out_dir={out[name]}"] + ([paths[name]] if name in paths else [])))
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Every run exported in both formats (in-process: the CLI is tested below), then reloaded outside."""
    d = tmp_path_factory.mktemp("exports")
    dests = {(fmt, name): str(d / fmt / name) for fmt in FORMATS for name in runs}
    for (fmt, name), dest in dests.items():
        export.save(load_run(runs[name]), runs[name], dest, fmt)
    script = d / "reload.py"
    script.write_text(RELOAD)
    env = {k: v for k, v in devices_env().items() if k != "PYTHONPATH"}
    names = list(runs)
    procs = {fmt: subprocess.Popen([sys.executable, str(script), fmt, str(d / f"{fmt}.npz"),
                                    *(dests[fmt, n] for n in names)], cwd=d, env=env, stdout=subprocess.DEVNULL,
                                   stderr=open(d / f"{fmt}.log", "w"))
             for fmt in FORMATS}  # both at once: each mostly waits on its imports
    reloaded = {}
    for fmt, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (d / f"{fmt}.log").read_text()[-3000:]
        arrays = np.load(d / f"{fmt}.npz")
        reloaded[fmt] = {n: {k.split("/")[1]: arrays[k] for k in arrays.files if k.startswith(f"{i}/")}
                         for i, n in enumerate(names)}
    return dests, reloaded


@pytest.fixture(scope="module")
def models(runs):
    """Each run's model as load_run gives it: the outputs the exports must reproduce."""
    return {name: load_run(path).model for name, path in runs.items()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["transformer", *FAMILIES])
def test_the_export_reproduces_the_runs_outputs_outside_this_code(exported, models, name, fmt):
    dests, reloaded = exported
    got = reloaded[fmt][name]
    model = models[name]
    np.testing.assert_allclose(got["forward"], model(jnp.asarray(got["x"])), rtol=1e-5, atol=1e-5)
    sig = json.load(open(os.path.join(dests[fmt, name], "signature.json")))
    assert sig["forward"]["inputs"][0]["shape"][0] == "B"
    if name in ("transformer", "rnn_lm"):  # the decode loop's logits are the forward pass's at those positions
        np.testing.assert_allclose(got["decode"], model(jnp.asarray(got["seq"]))[:, 1:], rtol=1e-5, atol=1e-5)
        assert got["seq"].shape == (3, 6)
    else:
        assert "decode" not in sig and "decode" not in got


def test_signature_json_says_how_to_prepare_inputs(exported):
    dests, _ = exported
    sig = {name: json.load(open(os.path.join(dests["stablehlo", name], "signature.json")))
           for name in ("transformer", "cnn", "mlp", "encoder")}
    lm = sig["transformer"]
    assert lm["forward"]["inputs"] == [{"name": "tokens", "shape": ["B", "L"], "dtype": "int32"}]
    assert lm["forward"]["constraints"] == ["L <= 16"]  # the model has 16 positions
    assert lm["forward"]["outputs"][0]["shape"] == ["B", "L", len(lm["preprocessing"]["vocab"])]
    assert [c["shape"] for c in lm["decode"]["inputs"][0]["list"]] == [["B", 16, 2, 8]] * 4  # reference layout
    assert set(sig["cnn"]["preprocessing"]) >= {"mean", "std", "image_shape", "labels"}
    assert sig["cnn"]["forward"]["inputs"][0]["shape"] == ["B", 8, 8, 3]
    assert sig["cnn"]["weights"]["leaves"].keys() >= {"norms/0/mean", "norms/0/var"}  # batch statistics travel too
    assert sig["mlp"]["preprocessing"]["features"][2] == {"name": "city", "categories": ["a", "b", "c"]}
    assert sig["mlp"]["forward"]["outputs"][0]["name"] == "values" and "target_std" in sig["mlp"]["preprocessing"]
    assert os.path.isfile(os.path.join(dests["stablehlo", "encoder"], "tokenizer.json"))
    assert sig["encoder"]["preprocessing"]["labels"] == [0, 1]


def test_weights_are_arguments_so_one_program_serves_another_checkpoint(exported, runs, models):
    dests, _ = exported
    exp = jax.export.deserialize(open(os.path.join(dests["stablehlo", "transformer"], "model.jaxexport"), "rb").read())
    earlier = load_run(runs["transformer"], step=10)
    weights, _ = export.flat_weights(earlier.state)
    x = np.arange(14, dtype=np.int32).reshape(2, 7) % 20
    np.testing.assert_allclose(exp.call(weights, x), earlier.model(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(exp.call(weights, x), models["transformer"](jnp.asarray(x)), atol=1e-3)


def test_the_cli_exports_with_a_fixed_batch_and_replaces_only_with_overwrite(runs, models, tmp_path):
    dest = tmp_path / "cnn"
    args = [f"out_dir={runs['cnn']}", "format=stablehlo", f"dest={dest}", "batch=2", "platforms=[cpu]"]
    proc = run_cli("export.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote step 2" in proc.stderr and proc.stdout == ""
    sig = json.loads((dest / "signature.json").read_text())
    assert sig["forward"]["inputs"][0]["shape"] == [2, 8, 8, 3] and sig["platforms"] == ["cpu"]
    exp = jax.export.deserialize((dest / "model.jaxexport").read_bytes())
    x = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(exp.call(dict(np.load(dest / "params.npz")), x),
                               models["cnn"](jnp.asarray(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):  # the batch is fixed: 3 rows do not fit
        exp.call(dict(np.load(dest / "params.npz")), np.zeros((3, 8, 8, 3), np.float32))
    assert "exists; pass overwrite=true" in one_line_error(run_cli("export.py", *args))
    (dest / "stale").write_text("from before")
    proc = run_cli("export.py", *args[:-2], "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (dest / "stale").exists()
    assert json.loads((dest / "signature.json").read_text())["forward"]["inputs"][0]["shape"][0] == "B"  # the new one
    assert sorted(os.listdir(tmp_path)) == ["cnn"]  # no staging directory left beside it


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("no checkpoints", "holds no checkpoints"),
    ("unknown format", "format=onnx is not one of stablehlo, savedmodel"),
    ("dest exists", "exists; pass overwrite=true"),
    ("dest is no export", "holds no export (no signature.json)"),
    ("dest under a file", "is not writable"),
    ("no such step", "no checkpoint at step 7 in "),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, runs, tmp_path):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("")
    out_dir, fmt, dest, extra = runs["mlp"], "stablehlo", tmp_path / "new", []
    if case == "no checkpoints":
        out_dir = tmp_path / "empty_run"
    elif case == "unknown format":
        fmt = "onnx"
    elif case in ("dest exists", "dest is no export"):
        dest, extra = tmp_path / "taken", (["overwrite=true"] if case == "dest is no export" else [])
    elif case == "dest under a file":
        dest = tmp_path / "a_file" / "export"
    else:
        extra = ["step=7"]
    before = sorted(os.listdir(tmp_path))
    line = one_line_error(run_cli("export.py", f"out_dir={out_dir}", f"format={fmt}", f"dest={dest}", *extra))
    assert expected in line
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failure_while_writing_leaves_nothing(runs, tmp_path, monkeypatch):
    def full_disk(*args):
        open(os.path.join(args[2], "model.jaxexport"), "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_stablehlo", full_disk)
    dest = export.check_dest(str(tmp_path / "out"), overwrite=False)
    with pytest.raises(UserError, match="No space left on device"):
        export.save(load_run(runs["mlp"]), runs["mlp"], dest, "stablehlo")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_auto_matmuls_export_as_float32_whatever_the_exporting_cpu(monkeypatch, cpu_bf16):
    """One artifact serves cpu, cuda and tpu, so `auto` must not freeze the exporting machine's choice into it."""
    from types import SimpleNamespace

    from model import matmul
    monkeypatch.setattr(matmul, "_cpu_has_bf16_matmul", lambda: cpu_bf16)
    for dtype, expected in (("auto", matmul.flat_dot_general), ("bfloat16", matmul.bf16_dot_general)):
        run = SimpleNamespace(cfg=compose(TINY + [f"model.matmul_dtype={dtype}"]), meta={"dims": {"vocab_size": 13}})
        dots = [m.dot_general for _, m in nnx.iter_modules(export.portable_model(run)) if hasattr(m, "dot_general")]
        assert dots and all(d is expected for d in dots), dtype
