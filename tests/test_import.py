"""import_checkpoint.py: nanoGPT and Hugging Face GPT-2 checkpoints become runs whose logits equal the source's.

The fixtures (tests/fixtures/import, made by tests/fixtures/make_import_fixtures.py under torch) hold tiny
checkpoints and their source's float32 logits on tokens.npy; these tests read them without torch. The
live test at the end regenerates them when torch and transformers are importable (or
$JAXLAB_TORCH_PYTHON names an interpreter that has them) and compares again.
"""
import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY, compose, run_cli
from core import config, importer, tensorfile
from core.importer import ImportConfig
from core.state import load_run
from data.tokenizer import codec
from errors import UserError

FIX = os.path.join(ROOT, "tests", "fixtures", "import")
NANO, HF, HF_BIN = (os.path.join(FIX, d) for d in ("nanogpt", "hf_gpt2", "hf_gpt2_bin"))
CKPT, META = os.path.join(NANO, "ckpt.pt"), os.path.join(NANO, "meta.pkl")
TOL = 1e-4  # float32 logits of the source implementation (the target)


def do_import(out_dir, source, path, **kw):
    return importer.run(OmegaConf.structured(ImportConfig(source=source, path=path, out_dir=str(out_dir), **kw)))


def logits(run_dir, tokens=None, **model_changes):
    """The imported model's logits on the fixtures' tokens (model_changes: rebuild with other config values)."""
    import jax
    from flax import nnx

    import model as models

    run = load_run(str(run_dir))
    tokens = np.load(os.path.join(FIX, "tokens.npy")) if tokens is None else tokens
    m = run.model
    if model_changes:
        cfg = OmegaConf.merge(run.cfg.model, model_changes)
        m = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, run.meta["dims"], rngs=nnx.Rngs(0)))),
                      run.state["params"], run.state["rest"])
    return np.asarray(jax.jit(lambda t: m(t))(tokens))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The nanoGPT ckpt.pt imported by the CLI; its bf16 torch.compile variant and both HF layouts in-process."""
    root = tmp_path_factory.mktemp("imported")
    out = run_cli("import_checkpoint.py", "source=nanogpt", f"path={CKPT}", f"out_dir={root / 'nano'}", f"meta={META}")
    assert out.returncode == 0, out.stderr
    assert "model.activation=gelu" in out.stderr  # what an init_from= run must pass
    do_import(root / "bf16", "nanogpt", os.path.join(NANO, "ckpt_compiled_bf16.pt"), meta=META)
    do_import(root / "hf", "hf", HF)
    do_import(root / "hf_bin", "hf", HF_BIN)
    return root


def test_reader_loads_a_whole_nanogpt_checkpoint_and_both_hf_formats_alike():
    ckpt = tensorfile.read_torch(CKPT)
    assert ckpt["iter_num"] == 250 and ckpt["model_args"]["n_layer"] == 2 and ckpt["config"]["dataset"]
    assert float(ckpt["best_val_loss"]) == pytest.approx(1.4697) and ckpt["best_val_loss"].shape == ()
    moments = ckpt["optimizer"]["state"][0]  # AdamW's state, read though unused
    assert moments["exp_avg"].shape == ckpt["model"]["transformer.wte.weight"].shape
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    bf16 = tensorfile.read_torch(os.path.join(NANO, "ckpt_compiled_bf16.pt"))["model"]
    assert all(k.startswith("_orig_mod.") and v.dtype.name == "bfloat16" for k, v in bf16.items())
    st, bin_ = tensorfile.read_safetensors(os.path.join(HF, "model.safetensors")), \
        tensorfile.read_torch(os.path.join(HF_BIN, "pytorch_model.bin"))
    assert {k.removeprefix("transformer.") for k in st} <= set(bin_)
    for k, v in st.items():
        np.testing.assert_array_equal(v, bin_[k.removeprefix("transformer.")])


@pytest.mark.parametrize("name,reference", [("nano", "nanogpt/logits.npy"), ("bf16", "nanogpt/logits_bf16.npy"),
                                            ("hf", "hf_logits.npy"), ("hf_bin", "hf_logits.npy")])
def test_imported_logits_equal_the_source_implementation(runs, name, reference):
    ref = np.load(os.path.join(FIX, reference))
    ours = logits(runs / name)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= TOL
    # The check can fail: the other GELU is off by over ten times the tolerance on these weights.
    other = "gelu_tanh" if load_run(str(runs / name)).cfg.model.activation == "gelu" else "gelu"
    assert np.abs(logits(runs / name, activation=other) - ref).max() > 10 * TOL


def test_imported_runs_are_normal_runs(runs):
    nano, hf = load_run(str(runs / "nano")), load_run(str(runs / "hf"))
    assert nano.step == 250 and hf.step == 0
    assert nano.meta["vocab"] == "".join(tensorfile.read_pickle(META)["itos"][i] for i in range(65))
    assert nano.cfg.model.bias and nano.cfg.model.block_size == 32 and nano.cfg.model.activation == "gelu"
    assert hf.cfg.model.activation == "gelu_tanh" and hf.meta["dims"] == {"vocab_size": 300}
    text = "To be, or not to be: that is the question."
    from_json, from_merges = (codec(load_run(str(runs / n)).meta) for n in ("hf", "hf_bin"))
    assert from_json.kind == "subword" and from_json.decode(from_json.encode(text)) == text
    np.testing.assert_array_equal(from_json.encode(text), from_merges.encode(text))  # vocab.json + merges.txt alike
    record = json.load(open(runs / "nano" / importer.REPORT))
    assert record["source"] == "nanogpt" and record["step"] == 250 and os.path.isfile(runs / "nano" / "config.yaml")
    assert sorted(os.listdir(runs)) == ["bf16", "hf", "hf_bin", "nano"]  # nothing staged is left beside them


def test_an_imported_gpt2_run_compresses(runs, tmp_path, monkeypatch):
    """Its meta holds only the tokenizer: evaluated on the config's text (tiny Shakespeare) in its BPE."""
    from core import compress
    from conftest import compose

    monkeypatch.setattr(compress, "MIN_SECONDS", 0.0)
    report = compress.run(compose([f"out_dir={runs / 'hf'}", f"dest={tmp_path / 'q'}"], "compress"))
    assert np.isfinite(report["val_loss_before"]) and abs(report["val_loss_after"] - report["val_loss_before"]) < 0.05
    assert load_run(str(tmp_path / "q")).meta["tokenizer"] == load_run(str(runs / "hf")).meta["tokenizer"]


@pytest.mark.parametrize("name,prompt", [("nano", "ROMEO:"), ("hf", "To be")])
def test_sample_py_reads_an_imported_run(runs, name, prompt):
    out = run_cli("sample.py", f"out_dir={runs / name}", "max_new_tokens=8", "num_samples=2", f"prompt={prompt}")
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("\n---\n")
    assert len(samples) == 2 and all(s.startswith(prompt) for s in samples)


def test_an_imported_run_trains_on_and_starts_others(runs, tmp_path, capsys, text_file):
    """Its own config resumes it with the printed model overrides; init_from= loads every param."""
    from core.loop import run

    model = json.load(open(runs / "nano" / importer.REPORT))["model_overrides"]
    own = tmp_path / "own"
    shutil.copytree(runs / "nano", own)
    result = run(compose(model + [f"out_dir={own}", "steps=251", "data.seq_len=32", "eval_batches=1",
                                  "progress=false", "mesh.data=1"]))
    assert result["step"] == 251
    started = run(compose(TINY + model[1:] + [f"init_from={runs / 'nano'}", f"data.path={text_file}",
                                              f"out_dir={tmp_path / 'started'}", "steps=2", "eval_every=2"]))
    assert started["step"] == 2 and np.isfinite(started["val_loss"])
    assert "loaded 16 of 16 param tensors" in capsys.readouterr().err


def test_a_gpt2_import_starts_a_run_on_data_prepared_with_its_tokenizer(runs, tmp_path, capsys, text_file):
    from core.loop import run

    out = run_cli("prepare.py", f"input={text_file}", f"tokenizer={HF}", f"dest={tmp_path / 'ds'}")
    assert out.returncode == 0, out.stderr
    model = json.load(open(runs / "hf" / importer.REPORT))["model_overrides"]
    started = run(compose(TINY + model[1:] + [f"init_from={runs / 'hf'}", "data=tokens", f"data.dir={tmp_path / 'ds'}",
                                              f"out_dir={tmp_path / 'started'}", "steps=2", "eval_every=2"]))
    assert started["step"] == 2 and "loaded 16 of 16 param tensors" in capsys.readouterr().err


def test_a_padded_vocab_keeps_the_checkpoints_rows(tmp_path, monkeypatch):
    """nanoGPT pads GPT-2's vocab (50,257 -> 50,304): the model keeps every row, the tokenizer its size."""
    ckpt = tensorfile.read_torch(CKPT)
    sd = dict(ckpt["model"])
    pad = np.zeros((320 - 65, 16), np.float32)
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = np.concatenate([sd["lm_head.weight"], pad])
    padded = {**ckpt, "model": sd, "model_args": {**ckpt["model_args"], "vocab_size": 320}}
    monkeypatch.setattr(tensorfile, "read_torch", lambda path: padded)
    do_import(tmp_path / "run", "nanogpt", CKPT, tokenizer=HF)  # a 300-token BPE into 320 rows
    run = load_run(str(tmp_path / "run"))
    assert run.meta["dims"] == {"vocab_size": 320} and "tokenizer" in run.meta
    ours = logits(tmp_path / "run")
    assert np.abs(ours[..., :65] - np.load(os.path.join(NANO, "logits.npy"))).max() <= TOL
    assert np.all(ours[..., 65:] == 0)


class Settings:  # a class the reader does not know: loads as an inert placeholder
    def __init__(self):
        self.lr, self.betas = 0.1, (0.9, 0.95)


class Command:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_a_pickle_runs_no_code_and_keeps_what_it_does_not_know_inert(tmp_path):
    flag = tmp_path / "ran"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"settings": Settings(), "run": Command(f"touch {flag}"), "n": 3}, protocol=2))
    loaded = tensorfile.read_pickle(str(path))
    assert loaded["n"] == 3 and not flag.exists()
    assert isinstance(loaded["settings"], tensorfile.Opaque) and loaded["settings"].state["lr"] == 0.1
    assert isinstance(loaded["run"], tensorfile.Opaque) and type(loaded["run"]).__name__ == "posix.system"


def write_safetensors(path, tensors: dict) -> None:
    """A safetensors file (float32 tensors), written by hand as the format describes."""
    header, offset = {}, 0
    for k, v in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(np.ascontiguousarray(v, np.float32).tobytes()
                                                               for v in tensors.values()))


def hf_copy(tmp_path, config_changes=None, extra=None):
    d = tmp_path / "hf"
    shutil.copytree(HF, d)
    if config_changes:
        c = json.load(open(d / "config.json"))
        json.dump({**c, **config_changes}, open(d / "config.json", "w"))
    if extra:
        weights = tensorfile.read_safetensors(str(d / "model.safetensors"))
        write_safetensors(d / "model.safetensors", {**weights, **extra})
    return str(d)


@pytest.mark.parametrize("change,named", [
    ({"model_type": "gpt_neox"}, "model_type='gpt_neox'"), ({"n_inner": 40}, "n_inner=40"),
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"n_layer": 3}, "lacks weight 'h.2.attn.c_proj.bias'"), ({"n_embd": 32}, "'h.0.attn.c_proj.bias' has shape (16,)"),
])
def test_another_hf_architecture_is_refused_naming_the_key(tmp_path, change, named):
    with pytest.raises(UserError, match="^[^\n]*" + named.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        do_import(tmp_path / "run", "hf", hf_copy(tmp_path, change))
    assert not os.path.exists(tmp_path / "run")


def test_weights_without_a_place_or_a_forks_switch_are_named(tmp_path, monkeypatch):
    extra = {"transformer.h.0.attn.rotary.inv_freq": np.ones(4, np.float32)}
    with pytest.raises(UserError, match="'h.0.attn.rotary.inv_freq' has no place"):
        do_import(tmp_path / "run", "hf", hf_copy(tmp_path, extra=extra))
    ckpt = tensorfile.read_torch(CKPT)
    fork = {**ckpt, "model_args": {**ckpt["model_args"], "use_rmsnorm": True, "use_svd": False}}
    monkeypatch.setattr(tensorfile, "read_torch", lambda path: fork)
    with pytest.raises(UserError, match=r"model_args\['use_rmsnorm'\]=True"):
        do_import(tmp_path / "run", "nanogpt", CKPT, meta=META)
    untied = {**ckpt, "model": {**ckpt["model"], "lm_head.weight": ckpt["model"]["lm_head.weight"] + 1}}
    monkeypatch.setattr(tensorfile, "read_torch", lambda path: untied)
    with pytest.raises(UserError, match="lm_head.weight differs"):
        do_import(tmp_path / "run", "nanogpt", CKPT, meta=META)
    assert os.listdir(tmp_path) == ["hf"]


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path):
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(open(CKPT, "rb").read()[:60_000])
    damaged = bytearray(open(CKPT, "rb").read())
    damaged[damaged.find(b"ckpt/data/0") + 300] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    hf_trunc = hf_copy(tmp_path)
    with open(os.path.join(hf_trunc, "model.safetensors"), "r+b") as f:
        f.truncate(30_000)
    os.makedirs(tmp_path / "taken")
    cases = [
        (["source=nanogpt", f"path={trunc}", f"meta={META}"], "truncated"),
        (["source=nanogpt", f"path={tmp_path / 'damaged.pt'}", f"meta={META}"], "Bad CRC"),
        (["source=hf", f"path={hf_trunc}"], "does not fit the file"),
        (["source=nanogpt", f"path={tmp_path / 'missing.pt'}", f"meta={META}"], "does not exist"),
        (["source=nanogpt", f"path={CKPT}"], "meta=PATH/meta.pkl"),
        (["source=hf", f"path={NANO}"], "no config.json"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            do_import(tmp_path / "run", **dict(a.split("=", 1) for a in args))
    out = run_cli("import_checkpoint.py", *cases[0][0], f"out_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = run_cli("import_checkpoint.py", "source=nanogpt", f"path={CKPT}", f"meta={META}",
                  f"out_dir={tmp_path / 'taken'}")
    assert out.returncode == 2 and "exists" in out.stderr and os.listdir(tmp_path / "taken") == []
    assert sorted(os.listdir(tmp_path)) == ["damaged.pt", "hf", "taken", "trunc.pt"]


def test_activation_is_checked_and_older_configs_still_load():
    from model import transformer

    with pytest.raises(UserError, match="model.activation=relu"):
        transformer.check(OmegaConf.structured(transformer.Config(activation="relu")))
    current = OmegaConf.to_container(compose(TINY), resolve=True)
    saved = json.loads(json.dumps(current))
    del saved["model"]["activation"]  # a checkpoint from before the key
    assert config.diff(saved, current) == ([], ["model.activation"])


TORCH_PYTHON = os.environ.get("JAXLAB_TORCH_PYTHON") or (
    "python" if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers") else None)


@pytest.mark.skipif(TORCH_PYTHON is None, reason="needs torch and transformers (or $JAXLAB_TORCH_PYTHON)")
def test_live_fixtures_made_now_import_with_their_logits(tmp_path):
    import sys

    python = sys.executable if TORCH_PYTHON == "python" else TORCH_PYTHON
    subprocess.run([python, os.path.join(ROOT, "tests", "fixtures", "make_import_fixtures.py"), str(tmp_path / "fx")],
                   check=True, capture_output=True, timeout=600)
    fx = tmp_path / "fx"
    do_import(tmp_path / "nano", "nanogpt", str(fx / "nanogpt" / "ckpt.pt"), meta=str(fx / "nanogpt" / "meta.pkl"))
    do_import(tmp_path / "hf", "hf", str(fx / "hf_gpt2"))
    tokens = np.load(fx / "tokens.npy")
    for name, reference in (("nano", "nanogpt/logits.npy"), ("hf", "hf_logits.npy")):
        assert np.abs(logits(tmp_path / name, tokens) - np.load(fx / reference)).max() <= TOL
