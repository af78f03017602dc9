"""model=rnn on data=text_classify: an LSTM/GRU text classifier, one or both directions."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose, run_cli
from core import metrics
from model import build
from test_encoder import write_sentiment

RNN_TEXT = ["model=rnn", "data=text_classify", "task=classify", "model.n_layers=2", "model.d_hidden=16",
            "data.seq_len=24", "data.vocab_size=120", "batch_size=16", "eval_batches=4", "progress=false",
            "mesh.data=1", "optim.warmup_steps=2", "log_every=10"]


def tiny(**cfg):
    c = compose(RNN_TEXT + [f"model.{k}={v}" for k, v in cfg.items()]).model
    return build(c, {"vocab_size": 30, "num_classes": 3}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_changes_nothing_and_the_backward_layer_reads_later_tokens(cell):
    x_BL = jnp.array([[2, 7, 8, 9, 3, 0, 0], [2, 5, 6, 3, 0, 0, 0]], jnp.int32)  # [CLS] words [SEP] [PAD]...
    padded_BL = jnp.pad(x_BL, ((0, 0), (0, 5)))
    later_BL = x_BL.at[0, 3].set(11)  # row 0's last word changes
    for pooling in ("mean", "last"):
        for bidirectional in (False, True):
            m = tiny(cell=cell, pooling=pooling, bidirectional=bidirectional)
            np.testing.assert_allclose(m(padded_BL), m(x_BL), atol=1e-6)
            emb_BLK = m.embed(x_BL)
            zero = (jnp.zeros((2, 16)),) * 2
            mask_BL = x_BL != 0
            fwd = m._layer(0, emb_BLK, zero, mask_BL)[1][0, :3]
            fwd_later = m._layer(0, m.embed(later_BL), zero, later_BL != 0)[1][0, :3]
            np.testing.assert_allclose(fwd, fwd_later, atol=1e-6)  # the forward reads nothing after a step
            changed = np.abs(m(later_BL)[0] - m(x_BL)[0]).max()
            assert changed > 1e-4 and np.allclose(m(later_BL)[1], m(x_BL)[1], atol=1e-6)
            if bidirectional:  # the first token's backward output has read the changed later word
                bwd = m._layer(0, emb_BLK, zero, mask_BL, backward=True)[1][0, 0]
                bwd_later = m._layer(0, m.embed(later_BL), zero, later_BL != 0, backward=True)[1][0, 0]
                assert np.abs(bwd - bwd_later).max() > 1e-4


def test_word_dropout_turns_words_into_unk_in_training_only():
    m = tiny(word_dropout=0.5, dropout=0.0, bidirectional=True)
    x_BL = jnp.array([[2, 7, 8, 9, 3, 0]] * 4, jnp.int32)
    np.testing.assert_allclose(m(x_BL), m(x_BL), atol=0)
    key = jax.random.key(0)
    train = m(x_BL, key=key)
    assert not np.allclose(train[0], train[1], atol=1e-5)  # each row draws its own [UNK]s
    np.testing.assert_allclose(train, m(x_BL, key=key), atol=0)  # a pure function of the key
    hit_BL = jax.random.bernoulli(jax.random.split(key, 2 + 2)[0], 0.5, x_BL.shape) & (x_BL >= 5)
    unk_BL = jnp.where(hit_BL, 1, x_BL)  # words only: [CLS] [SEP] [PAD] stay
    assert (unk_BL[:, [0, 4, 5]] == x_BL[:, [0, 4, 5]]).all() and (unk_BL == 1).any()
    np.testing.assert_allclose(train, m(unk_BL), atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_pooling_reads_the_forward_state_at_the_last_word_and_the_backward_at_the_first(bidirectional):
    m = tiny(pooling="last", bidirectional=bidirectional, n_layers=1)
    x_BL = jnp.array([[2, 7, 8, 9, 3, 0, 0], [2, 5, 6, 3, 0, 0, 0]], jnp.int32)
    zero, mask_BL = (jnp.zeros((2, 16)),) * 2, x_BL != 0
    fwd_BLH = m._layer(0, m.embed(x_BL), zero, mask_BL)[1]
    pooled = [fwd_BLH[jnp.arange(2), jnp.array([4, 3])]]  # at each row's [SEP]
    if bidirectional:
        pooled.append(m._layer(0, m.embed(x_BL), zero, mask_BL, backward=True)[1][:, 0])  # at [CLS]
    np.testing.assert_allclose(m(x_BL), m.head(jnp.concatenate(pooled, -1)), atol=1e-6)


def test_a_bidirectional_lstm_classifies_sentiment_and_predict_reads_its_run(tmp_path):
    train = write_sentiment(tmp_path / "train.tsv", 1000, 0)
    dev = write_sentiment(tmp_path / "dev.tsv", 200, 1)
    out = str(tmp_path / "run")
    proc = run_cli("train.py", *RNN_TEXT, f"data.path={train}", f"data.val_path={dev}", "model.bidirectional=true",
                   "model.word_dropout=0.1", "model.dropout=0.1", "data.group_by_length=4", "steps=80",
                   "eval_every=40", "ckpt_every=40", "optim.lr=1e-2", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    val = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_accuracy" in r]
    assert val[-1]["step"] == 80 and val[-1]["val_accuracy"] > 0.8, val  # chance is about 0.5
    proc = run_cli("predict.py", f"out_dir={out}", "text=the movie was wonderful and really good")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)
    assert str(row["label"]) == "1" and len(row["probs"]) == 2 and max(row["probs"].values()) > 0.5, row
    (tmp_path / "bytes.bin").write_bytes(bytes(range(256)))
    for path, message in ((tmp_path / "bytes.bin", "is not UTF-8 text"), (tmp_path, "is a directory")):
        proc = run_cli("predict.py", f"out_dir={out}", f"path={path}")
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_starting_from_or_distilling_a_character_lm_is_refused_in_one_line(tmp_path, text_file):
    from core.loop import run
    from errors import UserError
    lm = str(tmp_path / "lm")
    run(compose(["model=rnn", "model.d_hidden=16", "model.n_layers=1", "data.seq_len=16", "batch_size=4", "steps=2",
                 "eval_every=2", "eval_batches=1", "progress=false", "mesh.data=1", f"data.path={text_file}",
                 f"out_dir={lm}"]))
    train = write_sentiment(tmp_path / "train.tsv", 50, 0)
    for start, message in ((f"init_from={lm}", "has a vocabulary without WordPiece's"),  # [PAD]=0: a character
                           (f"distill.teacher={lm}", "was trained for task=lm; this run trains task=classify")):
        out = tmp_path / "cls"
        with pytest.raises(UserError, match=message) as e:
            run(compose(RNN_TEXT + ["model.d_hidden=16", "model.n_layers=1", f"data.path={train}", "steps=2",
                                    start, f"out_dir={out}"]))
        assert "\n" not in str(e.value) and not out.exists()


def test_an_lstm_reads_an_encoders_tokenizer_and_an_encoder_distils_from_both(tmp_path, text_file):
    from core.loop import run
    from core.state import load_run
    from errors import UserError
    from test_encoder import ENC_TINY
    train = write_sentiment(tmp_path / "train.tsv", 200, 0)
    enc, lstm, student = (str(tmp_path / n) for n in ("enc", "lstm", "student"))
    run(compose(ENC_TINY + ["task=classify", f"data.path={train}", f"out_dir={enc}", "steps=4"]))
    own = str(tmp_path / "own")  # its own WordPiece is fitted with another vocabulary size
    run(compose(RNN_TEXT + ["model.bidirectional=true", f"data.path={train}", "steps=4", "data.vocab_size=90",
                            f"out_dir={own}"]))
    run(compose(RNN_TEXT + ["model.bidirectional=true", f"data.path={train}", "steps=4", "data.vocab_size=90",
                            f"data.tokenizer_from={enc}", f"out_dir={lstm}"]))
    metas = [load_run(d).meta for d in (enc, own, lstm)]
    assert metas[2]["tokenizer"] == metas[0]["tokenizer"] != metas[1]["tokenizer"]
    assert metas[2]["dims"]["vocab_size"] == metas[0]["dims"]["vocab_size"]
    run(compose(ENC_TINY + ["task=classify", f"data.path={train}", f"out_dir={student}", "steps=4",
                            f"distill.teacher=[{enc},{lstm}]", "distill.alpha=1.0", "distill.augment=0.2"]))
    rows = [r for r in metrics.read(os.path.join(student, "metrics.jsonl")) if "train_kl" in r]
    assert rows and all(r["train_kl"] > 0 and r["train_kl_augmented"] > 0 for r in rows)
    lm = str(tmp_path / "lm")
    run(compose(["model=rnn", "model.d_hidden=8", "model.n_layers=1", "data.seq_len=16", "batch_size=4", "steps=1",
                 "eval_every=1", "eval_batches=1", "progress=false", "mesh.data=1", f"data.path={text_file}",
                 f"out_dir={lm}"]))
    for source, message in ((lm, r"is a run without a subword tokenizer \(data=text\)"),
                            (tmp_path, "holds no checkpoint")):
        with pytest.raises(UserError, match=message):
            run(compose(RNN_TEXT + [f"data.path={train}", f"data.tokenizer_from={source}", "steps=1",
                                    f"out_dir={tmp_path / 'bad'}"]))
    with pytest.raises(UserError, match="has another tokenizer than the run init_from or distill.teacher names"):
        run(compose(RNN_TEXT + [f"data.path={train}", f"data.tokenizer_from={own}", f"distill.teacher={enc}",
                                "steps=1", f"out_dir={tmp_path / 'bad'}"]))
    assert not (tmp_path / "bad").exists()

    # a resumed run reads its own checkpoint's tokenizer: the source may have moved on
    os.rename(enc, enc + ".moved")
    assert run(compose(RNN_TEXT + ["model.bidirectional=true", f"data.path={train}", "steps=6", "data.vocab_size=90",
                                   f"data.tokenizer_from={enc}", f"out_dir={lstm}"]))["step"] == 6
    os.rename(enc + ".moved", enc)

    # predict.py averages the class probabilities of runs that read their own tokens
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was wonderful\nawful and boring plot\n")
    probs = []
    for runs in ([enc], [own], [enc, own]):
        proc = run_cli("predict.py", *(f"out_dir={r}" for r in runs), f"path={texts}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        probs.append([json.loads(line)["probs"] for line in proc.stdout.splitlines()])
    for a, b, both in zip(*probs, strict=True):
        for label in ("0", "1"):
            assert both[label] == pytest.approx((a[label] + b[label]) / 2, abs=1e-6)
    for runs, extra, message in (([enc, lm], [], "predict.py serves regressors and classifiers"),
                                 ([enc, own], ["step=4"], "step= picks one run's checkpoint"),
                                 ([enc], ["text=great"], "text=\"...\" or path=FILE, not both")):
        proc = run_cli("predict.py", *(f"out_dir={r}" for r in runs), f"path={texts}", *extra)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
