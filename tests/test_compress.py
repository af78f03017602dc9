"""compress.py: int8 weights with per-channel scales, and a compressed run that loads wherever a run does."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from conftest import compose, run_cli
from core import compress, export, mesh as mesh_lib
from core.loop import run
from core.state import load_run
from errors import UserError
from model import build, quant
from test_export import FAMILIES, QUICK, write_inputs
from test_serve import scheduled

REPORT_KEYS = {"val_loss_before", "val_loss_after", "bytes_before", "bytes_after", "tokens_per_s_before",
               "tokens_per_s_after", "method", "embeddings", "source", "step", "quantized"}


@pytest.fixture(scope="module")
def compressed(trained_run, tmp_path_factory):
    """conftest's tiny LM run compressed by the CLI, token embedding included."""
    dest = str(tmp_path_factory.mktemp("compressed") / "int8")
    out = run_cli("compress.py", f"out_dir={trained_run}", "method=int8", f"dest={dest}", "embeddings=true")
    assert out.returncode == 0, out.stderr
    return dest


def test_the_round_trip_error_is_at_most_half_a_step_per_output_channel():
    """Layer-stacked kernels (N, D, F) per layer and column; embeddings (V, D) per row; a zero channel stays zero."""
    rng = np.random.default_rng(0)
    w_NDF = rng.standard_normal((3, 16, 24)).astype(np.float32) * rng.uniform(0.01, 10, (3, 1, 24))
    w_NDF[1, :, 5] = 0
    e_VD = rng.standard_normal((10, 16)).astype(np.float32)
    for w, axis in ((w_NDF, -2), (e_VD, -1)):
        q, scale = quant.quantize(jnp.asarray(w), axis)
        assert q.dtype == jnp.int8 and scale.shape == tuple(np.delete(w.shape, w.ndim + axis))
        assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) <= 127
        err = np.abs(w - np.asarray(quant.dequantize(q, scale, axis)))
        assert np.all(err <= np.expand_dims(np.asarray(scale), axis) / 2 * (1 + 1e-6))
        assert np.all(np.max(np.abs(np.asarray(q)), axis=axis)[np.asarray(scale) != 1] == 127)  # full range used
    assert np.all(np.asarray(quant.dequantize(*quant.quantize(jnp.asarray(w_NDF), -2), -2))[1, :, 5] == 0)


@pytest.mark.parametrize("rows", [1, 7])
def test_int8_products_equal_the_dequantized_weights_product(rows):
    """Weight-only: to 16-bit activation precision; int8_dynamic: to int8 activation precision."""
    rng = np.random.default_rng(1)
    q, scale = quant.quantize(jnp.asarray(rng.standard_normal((32, 12)), jnp.float32), -2)
    x_TD = jnp.asarray(rng.standard_normal((rows, 32)), jnp.float32)
    exact_TF = x_TD @ quant.dequantize(q, scale, -2)
    bound_T1 = jnp.abs(x_TD).max(-1, keepdims=True) * jnp.abs(quant.dequantize(q, scale, -2)).sum(0)
    for dynamic, steps in ((False, quant.X_MAX), (True, quant.Q_MAX)):
        y_TF = quant.matmul(x_TD, q, scale, dynamic=dynamic)
        assert y_TF.shape == (rows, 12) and y_TF.dtype == jnp.float32
        assert jnp.all(jnp.abs(y_TF - exact_TF) <= bound_T1 / (2 * steps) + 1e-5)
    q_FD, scale_F = quant.quantize(jnp.asarray(rng.standard_normal((12, 32)), jnp.float32), -1)  # an embedding
    np.testing.assert_allclose(quant.matmul(x_TD, q_FD, scale_F, dynamic=False, transposed=True),
                               x_TD @ quant.dequantize(q_FD, scale_F, -1).T, rtol=1e-3, atol=1e-3)


MODELS = {  # family -> (overrides, dims, input)
    "transformer": (["+experiment=debug"], {"vocab_size": 32}, np.arange(24).reshape(2, 12) % 32),
    "transformer_scan": (["+experiment=debug", "model.scan_layers=true"], {"vocab_size": 32},
                         np.arange(24).reshape(2, 12) % 32),
    "encoder_mlm": (["model=encoder", "data=text_classify", "task=mlm", "model.n_layers=2", "model.d_model=16",
                     "model.n_heads=2", "model.dropout=0"], {"vocab_size": 32}, np.arange(1, 25).reshape(2, 12) % 32),
    "encoder_classify": (["model=encoder", "data=text_classify", "task=classify", "model.n_layers=2",
                          "model.d_model=16", "model.n_heads=2", "model.dropout=0"],
                         {"vocab_size": 32, "num_classes": 3}, np.arange(1, 25).reshape(2, 12) % 32),
    "mlp": (["model=mlp", "data=tabular", "task=regress", "model.hidden=[32,32]", "model.norm=layer"],
            {"in_features": 8, "out_features": 2}, np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)),
    "cnn": (["model=cnn", "data=images", "task=classify", "model.channels=[4,8]", "model.pool=[true,false]",
             "model.dense=[16]"], {"num_classes": 3, "image_shape": [8, 8, 1]},
            np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)),
}


def quantized_twin(cfg, dims, method, embeddings):
    """(float model, its int8 twin with the float params quantized, the paths made int8)."""
    float_model = build(cfg, dims, rngs=nnx.Rngs(0))
    keys = {"quant": method} | ({"quant_embeddings": embeddings} if "quant_embeddings" in cfg else {})
    qcfg = OmegaConf.merge(cfg, keys)
    abstract = nnx.eval_shape(lambda: build(qcfg, dims, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(float_model, nnx.Param, ...)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    qparams, done = quant.quantize_params(nnx.to_pure_dict(params), target)
    return float_model, nnx.merge(nnx.graphdef(abstract), qparams, nnx.to_pure_dict(rest)), done


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_a_quantized_model_gives_the_float_models_outputs(name, method):
    overrides, dims, x = MODELS[name]
    cfg = compose(overrides).model
    float_model, q_model, done = quantized_twin(cfg, dims, method, embeddings=True)
    want, got = np.asarray(float_model(jnp.asarray(x))), np.asarray(q_model(jnp.asarray(x)))
    assert got.shape == want.shape and any(p.endswith("kernel") for p in done)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(q_model, nnx.Param))}
    assert all(flat[p].get_value().dtype == jnp.int8 for p in done)
    assert ("wte/embedding" in done) == ("vocab_size" in dims)
    tolerance = 0.02 if method == "int8" else 0.05  # of the outputs' range: weights (and activations) in 255 steps
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want)), (name, method)


def test_the_compressed_run_loads_samples_serves_and_exports(compressed, tmp_path):
    """load_run, sample.py, the server's scheduler and export.py take it as any run, with its int8 params."""
    from core.sampler import compile_generate

    run_q = load_run(compressed)
    assert run_q.cfg.model.quant == "int8" and run_q.cfg.model.quant_embeddings
    assert run_q.state["params"]["blocks"]["mlp"]["fc"]["kernel"].dtype == jnp.int8
    assert run_q.state["params"]["wte"]["embedding"].dtype == jnp.int8
    assert not jax.tree.leaves(run_q.state["opt_state"])  # never trained: no optimizer moments

    generate = compile_generate(nnx.graphdef(run_q.model), max_new_tokens=20, temperature=0)
    tokens = np.asarray(generate(run_q.state["params"], run_q.state["rest"], np.asarray([[1, 2]], np.int32),
                                 jax.random.key(0)))[0]
    out = run_cli("sample.py", f"out_dir={compressed}", f"prompt='{run_q.vocab[1] + run_q.vocab[2]}'",
                  "num_samples=1", "max_new_tokens=20", "temperature=0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n")[2:] == "".join(run_q.vocab[t] for t in tokens)

    sampling = {"temperature": 1.0, "top_k": 5, "top_p": 0.9}
    one_device = mesh_lib.make_mesh(OmegaConf.create({"data": 1, "fsdp": 1}))  # as serve.py runs on this CPU
    (served,), (params, rest) = scheduled(load_run(compressed, mesh=one_device).model, [[1, 2, 3]], 21, [sampling])
    expected = compile_generate(nnx.graphdef(run_q.model), max_new_tokens=21, **sampling)(
        params, rest, np.asarray([[1, 2, 3]], np.int32), jax.random.key(0))
    assert served[0] == np.asarray(expected)[0].tolist()

    dest = str(tmp_path / "export")
    export.save(run_q, compressed, dest, "stablehlo", platforms=["cpu"])
    weights = dict(np.load(f"{dest}/params.npz"))
    assert weights["blocks/attn/qkv/kernel"].dtype == np.int8
    forward = jax.export.deserialize(open(f"{dest}/model.jaxexport", "rb").read())
    x_BL = np.asarray([[3, 1, 4, 1, 5]], np.int32)
    np.testing.assert_allclose(forward.call(weights, x_BL), run_q.model(x_BL), rtol=1e-5, atol=1e-5)


def test_compression_json_reports_quality_size_and_speed(compressed, trained_run):
    """val_loss_before is the loop's own last validation loss: the same eval batches and weighting."""
    report = json.load(open(os.path.join(compressed, compress.REPORT)))
    assert REPORT_KEYS <= set(report)
    logged = [json.loads(line) for line in open(os.path.join(trained_run, "metrics.jsonl"))]
    assert report["val_loss_before"] == pytest.approx([r for r in logged if "val_loss" in r][-1]["val_loss"], abs=1e-5)
    assert abs(report["val_loss_after"] - report["val_loss_before"]) < 0.01
    assert report["bytes_after"] < 0.5 * report["bytes_before"]
    assert report["embeddings"] and "wte/embedding" in report["quantized"]
    assert report["tokens_per_s_before"] > 0 and report["tokens_per_s_after"] > 0


def test_an_mlp_classifier_compresses_with_its_accuracy_reported(tmp_path, monkeypatch):
    """In-process, dynamic activations: the report carries the task's metrics, the model the float outputs."""
    overrides = FAMILIES["mlp"][:2] + ["task=classify", "data.target=city", "model.hidden=[32]"]
    src = str(tmp_path / "mlp")
    run(compose(overrides + QUICK + [f"out_dir={src}", write_inputs(tmp_path)["mlp"]]))
    monkeypatch.setattr(compress, "MIN_SECONDS", 0.0)
    report = compress.run(compose([f"out_dir={src}", f"dest={tmp_path / 'q'}", "method=int8_dynamic"], "compress"))
    assert {"val_accuracy_before", "val_accuracy_after", "rows_per_s_before", "rows_per_s_after"} <= set(report)
    assert report["quantized"] == ["head/kernel", "layers/0/kernel"]
    float_run, q_run = load_run(src), load_run(str(tmp_path / "q"))
    x_BF = np.random.default_rng(0).standard_normal((4, float_run.model.layers[0].in_features), np.float32)
    want = np.asarray(float_run.model(x_BF))
    assert np.max(np.abs(np.asarray(q_run.model(x_BF)) - want)) <= 0.05 * np.max(np.abs(want))


def test_a_run_whose_data_moved_is_evaluated_on_data_path(tmp_path, text_file, monkeypatch):
    from conftest import TINY

    moved, src = tmp_path / "input.txt", str(tmp_path / "run")
    moved.write_text(open(text_file).read())
    run(compose(TINY + [f"data.path={moved}", f"out_dir={src}", "steps=2", "eval_every=2"]))
    moved.unlink()
    monkeypatch.setattr(compress, "MIN_SECONDS", 0.0)
    with pytest.raises(UserError, match="which is gone; pass data_path=FILE"):
        compress.run(compose([f"out_dir={src}", f"dest={tmp_path / 'q'}"], "compress"))
    assert not (tmp_path / "q").exists()
    with pytest.raises(UserError, match=f"data_path={tmp_path}/typo.txt does not exist; pass the data the run "
                                        f"trained on \\(data.path={moved}\\)"):
        compress.run(compose([f"out_dir={src}", f"dest={tmp_path / 'q'}", f"data_path={tmp_path}/typo.txt"], "compress"))
    report = compress.run(compose([f"out_dir={src}", f"dest={tmp_path / 'q'}", f"data_path={text_file}"], "compress"))
    assert abs(report["val_loss_after"] - report["val_loss_before"]) < 0.01


@pytest.mark.parametrize("case, expected", [
    ("no_checkpoint", "holds no checkpoints"),
    ("method", "method=int4 is not one of int8, int8_dynamic"),
    ("dest_exists", "exists; pass overwrite=true"),
    ("dest_not_compressed", "holds no compressed run (no compression.json)"),
    ("quantized", "is already quantized"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, trained_run, compressed, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    dest = tmp_path / "dest"
    args = {"no_checkpoint": [f"out_dir={tmp_path / 'empty'}", f"dest={dest}"],
            "method": [f"out_dir={trained_run}", "method=int4", f"dest={dest}"],
            "dest_exists": [f"out_dir={trained_run}", f"dest={tmp_path / 'taken'}"],
            "dest_not_compressed": [f"out_dir={trained_run}", f"dest={tmp_path / 'taken'}", "overwrite=true"],
            "quantized": [f"out_dir={compressed}", f"dest={dest}"]}[case]
    out = run_cli("compress.py", *args)
    assert out.returncode == 2 and expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not dest.exists() and os.listdir(tmp_path / "taken") == []
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]  # no staging directory left behind either


def test_families_without_an_int8_form_and_embeddings_they_lack_are_refused():
    for overrides, embeddings, expected in ((["model=rnn"], False, "model=rnn has no int8 form"),
                                            (MODELS["mlp"][0], True, "model=mlp has no token embeddings")):
        with pytest.raises(UserError, match=expected):
            compress.quantized_config(compose(overrides), "int8", embeddings, "/src", "/dest")


def test_a_compressed_run_is_not_trained_or_started_from(compressed, tmp_path):
    out = run_cli("train.py", "+experiment=debug", f"out_dir={compressed}")
    assert out.returncode == 2 and "does not train" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="start from its float source"):
        run(compose(["+experiment=debug", "mesh.data=1", f"out_dir={tmp_path / 'r'}", f"init_from={compressed}",
                     f"data.path={load_run(compressed).cfg.data.path}"]))
    with pytest.raises(UserError, match="for inference only"):
        run(compose(["+experiment=debug", "model.quant=int8", f"out_dir={tmp_path / 'r2'}"]))
