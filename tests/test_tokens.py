"""Subword tokenizers, prepared token datasets (prepare.py, data=tokens) and bits per byte."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import httpx

from conftest import ROOT, TINY, compose, make_text, run_cli
from test_cli import one_line_error
from test_serve import Server

UNICODE = "Ünïcödé — naïve café, 日本語のテキスト; emoji 🙂.\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Two text files (one with non-ASCII characters): a directory input of two documents."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(make_text(30_000, seed=1))
    (root / "b.txt").write_text(make_text(10_000, seed=2) + UNICODE * 20)
    return root


def prepare(*args):
    return run_cli("prepare.py", *args)


@pytest.fixture(scope="module")
def bpe_dataset(corpus_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ds") / "bpe"
    proc = prepare(f"input={corpus_dir}", "tokenizer=bpe", "vocab_size=400", f"dest={dest}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dest


def test_bpe_round_trips_any_text_and_is_the_same_in_every_process():
    from data import tokenizer

    texts = [make_text(5_000), UNICODE * 5]
    tok = tokenizer.train_bpe(texts, 300)
    other = subprocess.run([sys.executable, "-c", "import sys, json; from data import tokenizer; "
                            "print(tokenizer.train_bpe(json.loads(sys.stdin.read()), 300), end='')"],
                           input=json.dumps(texts), capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert other == tok  # the run's meta holds it: an exact resume compares it
    codec = tokenizer.codec({"tokenizer": tok})
    assert codec.kind == "subword" and codec.size <= 300 and codec.eot == 0
    for text in ["", "hello", UNICODE, "unseen ∮ symbols \x00\t", make_text(2_000, seed=9)]:
        assert codec.decode(codec.encode(text)) == text
    assert len(codec.encode(make_text(5_000))) < 5_000 / 2  # merges learned: fewer tokens than characters


def test_pieces_encode_as_the_whole_text_does():
    from data import shards, tokenizer

    text = make_text(60_000, seed=4) + "\n\n  indented\n\tand tabs\n" + make_text(20_000, seed=5)
    codec = tokenizer.codec({"tokenizer": tokenizer.train_bpe([text], 500)})
    parts = list(shards.pieces(iter([text[i:i + 7_000] for i in range(0, len(text), 7_000)])))
    assert len(parts) > 10 and "".join(parts) == text
    assert np.array_equal(np.concatenate(codec.encode_batch(parts)), codec.encode(text))


def test_tokenizer_files_load_and_bad_ones_are_user_errors(tmp_path):
    from data import tokenizer
    from errors import UserError

    tok = tokenizer.train_bpe([make_text(3_000)], 300)
    (tmp_path / "tokenizer.json").write_text(tok)
    assert tokenizer.from_files(str(tmp_path)) == tokenizer.from_files(str(tmp_path / "tokenizer.json")) == tok
    vocab = json.loads(tok)["model"]["vocab"]  # GPT-2's layout: vocab.json + merges.txt
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps(vocab))
    (gpt2 / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in json.loads(tok)["model"]["merges"]) + "\n")
    codec = tokenizer.codec({"tokenizer": tokenizer.from_files(str(gpt2))})
    text = make_text(500, seed=3)
    assert codec.decode(codec.encode(text)) == text
    assert np.array_equal(codec.encode(text), tokenizer.codec({"tokenizer": tok}).encode(text))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="does not parse"):
        tokenizer.from_files(str(tmp_path / "bad.json"))


def test_prepare_writes_shards_that_decode_to_the_input(bpe_dataset, corpus_dir):
    from data import shards, tokenizer

    meta, train_T, val_T = shards.open_dataset(str(bpe_dataset))
    assert train_T.dtype == np.uint16 and isinstance(train_T, np.memmap)
    codec = tokenizer.codec({"tokenizer": meta["tokenizer_json"]})
    text = codec.decode(np.concatenate([train_T, val_T]))
    a, b = ((corpus_dir / f).read_text() for f in ("a.txt", "b.txt"))
    assert text == a + tokenizer.EOT + b  # documents separated by <|endoftext|>, nothing lost
    assert meta["train_bytes"] + meta["val_bytes"] == len((a + b).encode())
    assert abs(meta["val_bytes"] - 0.1 * 40_000) < 2 * shards.PIECE  # val_fraction 0.1, cut between pieces
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train_T), len(val_T))


def test_char_prepare_round_trips_and_a_rerun_is_a_no_op(corpus_dir, tmp_path):
    from data import shards

    dest = tmp_path / "char"
    assert prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", f"dest={dest}").returncode == 0
    before = {f: os.stat(dest / f).st_mtime_ns for f in os.listdir(dest)}
    proc = prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", f"dest={dest}")
    assert proc.returncode == 0 and "up to date" in proc.stderr
    assert {f: os.stat(dest / f).st_mtime_ns for f in os.listdir(dest)} == before
    meta, train_T, val_T = shards.open_dataset(str(dest))
    text = "".join(meta["vocab"][i] for i in np.concatenate([train_T, val_T]))
    assert text == (corpus_dir / "a.txt").read_text() + (corpus_dir / "b.txt").read_text()
    assert meta["val_bytes"] > meta["val_tokens"]  # the non-ASCII tail: more bytes than characters
    proc = prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", "val_fraction=0.2", f"dest={dest}")
    assert "pass overwrite=true" in one_line_error(proc)
    assert prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", "val_fraction=0.2", f"dest={dest}",
                   "overwrite=true").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["char"]
    # overwrite=true replaces datasets only: a run directory or a file at dest stays as it was
    run_dir, note = tmp_path / "run", tmp_path / "note.txt"
    (run_dir / "checkpoints").mkdir(parents=True)
    note.write_text("keep")
    for target in (run_dir, note):
        proc = prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", f"dest={target}", "overwrite=true")
        assert "holds other files than a prepared dataset" in one_line_error(proc)
    assert sorted(os.listdir(tmp_path)) == ["char", "note.txt", "run"] and note.read_text() == "keep"
    assert os.listdir(run_dir) == ["checkpoints"]
    proc = prepare(f"input={corpus_dir}/*.txt", "tokenizer=char", f"dest={note}/char")  # under a file
    assert "cannot create dest=" in one_line_error(proc) and note.read_text() == "keep"


def test_a_prepare_killed_midway_then_rerun_writes_what_an_uninterrupted_one_does(corpus_dir, bpe_dataset, tmp_path):
    dest = tmp_path / "bpe"
    kill = ("import os, signal, sys; from omegaconf import OmegaConf; from data import shards; "
            "seen = [0]\n"
            "def progress(n):\n"
            "    seen[0] += n\n"
            "    if seen[0] > 20_000: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"cfg = OmegaConf.structured(shards.Config(input={str(corpus_dir)!r}, vocab_size=400, dest={str(dest)!r}))\n"
            "shards.prepare(cfg, progress)")
    proc = subprocess.run([sys.executable, "-c", kill], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not dest.exists() and [p.name.startswith("bpe.tmp-") for p in tmp_path.iterdir()] == [True]
    assert prepare(f"input={corpus_dir}", "tokenizer=bpe", "vocab_size=400", f"dest={dest}").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["bpe"]  # the dead prepare's leftovers are gone
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (dest / f).read_bytes() == (bpe_dataset / f).read_bytes(), f


@pytest.mark.parametrize("case, expected", [
    ("empty", "holds no text"),
    ("not utf-8", "is not UTF-8 text (byte 3)"),
    ("glob matches nothing", "matches no file"),
    ("tokenizer does not parse", "does not parse as a tokenizers JSON file"),
    ("vocab does not fit dtype", "more than uint16 holds; pass dtype=uint32"),
    ("no dest", "pass dest=DIR"),
    ("unknown TFDS dataset", "TFDS has no dataset 'no_such_text_set'"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, expected, tmp_path):
    src, args = tmp_path / "in.txt", []
    src.write_text(make_text(2_000))
    if case == "empty":
        src.write_text("")
    elif case == "not utf-8":
        src.write_bytes(b"abc\xff\xfe")
    elif case == "glob matches nothing":
        src = tmp_path / "nothing*.txt"
    elif case == "tokenizer does not parse":
        (tmp_path / "tok.json").write_text('{"model": 3}')
        args = [f"tokenizer={tmp_path / 'tok.json'}"]
    elif case == "vocab does not fit dtype":
        src.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 20_000)) * 2
                       + "".join(chr(c) for c in range(0x20000, 0x20000 + 50_000)))
        args = ["tokenizer=char", "dtype=uint16"]
    dest = [] if case == "no dest" else [f"dest={tmp_path / 'out'}"]
    source = ["tfds_name=no_such_text_set"] if case == "unknown TFDS dataset" else [f"input={src}"]
    assert expected in one_line_error(prepare(*source, *args, *dest))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_memmapped_batches_equal_in_memory_ones_and_rows_partition_the_batch(bpe_dataset):
    from data import text, tokens
    from tasks import lm

    cfg = compose(TINY + ["data=tokens", f"data.dir={bpe_dataset}"])
    corpus = tokens.load(cfg.data)
    in_memory = text.Corpus(np.array(corpus.train_T, np.int32), np.array(corpus.val_T, np.int32), "")
    feeds = [lm.feed(c, cfg.data, seed=3, batch_size=8, rows=slice(0, 8), eval_batches=2) for c in (corpus, in_memory)]
    for step in (0, 7, 10_000):
        a, b = (f.train_batch(step) for f in feeds)
        assert a["x"].dtype == np.int32 and all(np.array_equal(a[k], b[k]) for k in ("x", "y"))
        halves = [lm.feed(corpus, cfg.data, seed=3, batch_size=8, rows=r, eval_batches=2).train_batch(step)
                  for r in (slice(0, 4), slice(4, 8))]  # what two processes build: their rows only
        assert np.array_equal(np.concatenate([h["x"] for h in halves]), a["x"])
    assert np.array_equal(feeds[0].eval_batch(1)[0]["y"], feeds[1].eval_batch(1)[0]["y"])


def test_bits_per_byte():
    from tasks import lm

    assert lm.finish({"val_loss": 2.0}, {"val_tokens_per_byte": 0.25})["val_bpb"] == pytest.approx(0.5 / math.log(2))
    assert "val_bpb" not in lm.finish({"val_loss": 2.0}, {})  # runs saved before bits per byte existed


def test_train_on_tokens_logs_bpb_samples_text_and_refuses_another_tokenizer_on_resume(bpe_dataset, corpus_dir,
                                                                                      tmp_path):
    import shutil

    from core import metrics
    from core.loop import run

    out, data = str(tmp_path / "run"), tmp_path / "data"
    shutil.copytree(bpe_dataset, data)
    run(compose(TINY + ["data=tokens", f"data.dir={data}", f"out_dir={out}", "steps=10", "eval_every=10"]))
    row = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_loss" in r][-1]
    meta = json.loads((bpe_dataset / "meta.json").read_text())
    assert row["val_bpb"] == pytest.approx(row["val_loss"] * meta["val_tokens"] / meta["val_bytes"] / math.log(2))
    proc = run_cli("sample.py", f"out_dir={out}", "num_samples=1", "max_new_tokens=12", 'prompt="Ünï"',
                   "temperature=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Ünï") and len(proc.stdout) > 5
    server = Server(f"out_dir={out}", "slots=2", "chunk_tokens=4")
    try:  # the server encodes and decodes with the run's BPE too: the same greedy text as sample.py
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Ünï", "max_tokens": 12, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert "Ünï" + reply.json()["choices"][0]["text"] + "\n" == proc.stdout
    finally:
        assert server.stop() == 0
    # The dataset prepared again in place with another tokenizer: the run must not resume on it.
    assert prepare(f"input={corpus_dir}", "tokenizer=char", f"dest={data}", "overwrite=true").returncode == 0
    proc = run_cli("train.py", *TINY, "data=tokens", f"data.dir={data}", f"out_dir={out}", "steps=20")
    assert "the data differs from the checkpoint's (" in one_line_error(proc) and "tokenizer" in proc.stderr
    proc = run_cli("train.py", *TINY, "data=tokens", f"data.dir={tmp_path}", "steps=2")
    assert "is not a prepared dataset" in one_line_error(proc)


def test_char_text_bpb_is_loss_over_ln2_and_bpe_text_runs_keep_their_tokenizer(tmp_path, text_file):
    from core import checkpoint, metrics
    from core.loop import run

    out = str(tmp_path / "char")
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=10", "eval_every=10"]))
    row = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_loss" in r][-1]
    assert row["val_bpb"] == row["val_loss"] / math.log(2)  # ASCII: one byte per token, exactly
    bpe = str(tmp_path / "bpe")
    run(compose(TINY + [f"data.path={text_file}", "data.tokenizer=bpe", "data.vocab_size=300", f"out_dir={bpe}",
                        "steps=10", "eval_every=10"]))
    tok = checkpoint.peek_meta(bpe)["tokenizer"]
    tuned = str(tmp_path / "tuned")  # init_from carries the tokenizer, whatever data.tokenizer says
    run(compose(TINY + [f"data.path={text_file}", f"init_from={bpe}", f"out_dir={tuned}", "steps=12",
                        "eval_every=12"]))
    assert checkpoint.peek_meta(tuned)["tokenizer"] == tok


def test_the_gpt2_124m_recipe_has_gpt2_small_shape_and_asks_for_its_data():
    import jax
    from flax import nnx

    import model as models

    cfg = compose(["+experiment=owt_gpt2_124m", "data.dir=unused"])
    shapes = nnx.eval_shape(lambda: models.build(cfg.model, {"vocab_size": 50257}, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    assert 123.5e6 < n < 124.5e6, n  # GPT-2 small without biases: 124.4M with them
    assert (cfg.data.seq_len, cfg.model.block_size, cfg.batch_size * cfg.data.seq_len) == (1024, 1024, 491_520)
    assert "needs data.dir=DIR" in one_line_error(run_cli("train.py", "+experiment=owt_gpt2_124m", "steps=1"))


def test_ids_past_the_tokenizer_decode_to_nothing():
    from data import tokenizer

    bpe = tokenizer.codec({"tokenizer": tokenizer.train_bpe([make_text(2_000)], 300)})
    char = tokenizer.codec({"vocab": "ab"})
    assert bpe.decode([*bpe.encode("the king"), 50_300]) == "the king"  # a padded vocabulary's spare rows
    assert char.decode([0, 1, 2, 0]) == "aba"
