"""data=text_classify and task=mlm beyond the basics: macro F1 over 3 classes, TFDS input, next-sentence
prediction, layer-wise learning-rate decay for fine-tuning, batches grouped by length."""
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose
from core import metrics
from core.config import check
from core.loop import run
from core.optim import make_optimizer
from core.state import load_run
from data import examples, text_classify, wordpiece
from errors import UserError
from test_encoder import ENC_TINY, FILLER, tiny_model

WORDS = {"neg": "bad awful".split(), "neu": "fine okay".split(), "pos": "good great".split()}


def write_three_classes(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for _ in range(n):
            y = rng.choice(list(WORDS))
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))] + [rng.choice(WORDS[y])]
            f.write(" ".join(rng.sample(words, len(words))) + f"\t{y}\n")
    return str(path)


def test_macro_f1_over_three_classes_is_exact_over_the_padded_eval_split(tmp_path):
    train, dev = write_three_classes(tmp_path / "t.tsv", 600, 0), write_three_classes(tmp_path / "d.tsv", 75, 1)
    out = str(tmp_path / "run")
    run(compose(ENC_TINY + ["task=classify", f"data.path={train}", f"data.val_path={dev}", f"out_dir={out}",
                            "steps=10", "eval_batches=50", "optim.lr=3e-3"]))  # 75 = 4 batches of 16 + 11 + padding
    val = [r for r in metrics.read(os.path.join(out, "metrics.jsonl")) if "val_loss" in r][-1]
    assert {"val_loss", "val_accuracy", "val_f1"} <= set(val) and not any(k.startswith("val_tp_") for k in val)
    r = load_run(out)
    src = text_classify.load(r.cfg.data, r.meta)
    pred, true = np.asarray(r.model(jnp.asarray(src.x_val))).argmax(-1), src.y_val
    f1s = []
    for c in range(3):
        tp, p, t = int(((pred == c) & (true == c)).sum()), int((pred == c).sum()), int((true == c).sum())
        if p + t:
            f1s.append(2 * tp / (p + t))
    assert val["val_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    assert val["val_accuracy"] == pytest.approx(float((pred == true).mean()), abs=1e-6)
    assert len(set(pred.tolist())) > 1  # not a constant prediction, where F1 would be trivial


def test_two_classes_log_no_f1(tmp_path):
    from tasks import classify
    assert classify.finish({"val_loss": 1.0, "val_accuracy": 0.5}, {}) == {"val_loss": 1.0, "val_accuracy": 0.5}
    val = {"val_loss": 1.0, "val_tp_0": 0.2, "val_pred_0": 0.3, "val_true_0": 0.4, "val_tp_1": 0.0,
           "val_pred_1": 0.0, "val_true_1": 0.0, "val_tp_2": 0.1, "val_pred_2": 0.7, "val_true_2": 0.6}
    assert classify.finish(val, {}) == {"val_loss": 1.0, "val_f1": pytest.approx((0.4 / 0.7 + 0.2 / 1.3) / 2)}


class FakeBuilder:
    """What data/text_classify.py reads of a prepared TFDS builder: features, splits, data sources."""

    def __init__(self, splits):
        self.splits = splits
        self.info = type("Info", (), {"features": {"idx": None, "sentence": None, "label": None},
                                      "splits": {k: None for k in splits}})()

    def as_data_source(self, split):
        return self.splits[split]


def test_tfds_glue_sst2_gives_the_splits_sentences_and_labels(monkeypatch):
    import data.download
    train = [{"idx": np.int32(i), "sentence": f"{w} movie {w}".encode(), "label": np.int64(i % 2)}
             for i, w in enumerate(FILLER * 3)]
    dev = [{"idx": np.int32(0), "sentence": b"a very good film", "label": np.int64(1)},
           {"idx": np.int32(1), "sentence": b"bad plot", "label": np.int64(0)}]
    seen = {}

    def prepare(cfg, hint):
        seen["name"], seen["dir"] = cfg.tfds_name, cfg.tfds_data_dir
        return FakeBuilder({"train": train, "validation": dev, "test": dev})

    monkeypatch.setattr(data.download, "prepare", prepare)
    cfg = compose(ENC_TINY + ["task=classify", "data.tfds_name=glue/sst2", "data.tfds_data_dir=/somewhere"]).data
    src = text_classify.load(cfg)
    assert seen == {"name": "glue/sst2", "dir": "/somewhere"} and src.labels == [0, 1]
    assert src.y_train.tolist() == [i % 2 for i in range(len(train))] and src.y_val.tolist() == [1, 0]
    from data import wordpiece
    expected, _ = wordpiece.encode(src.tokenizer, [e["sentence"].decode() for e in train], cfg.seq_len)
    np.testing.assert_array_equal(src.x_train, expected)
    assert wordpiece.decode(src.tokenizer, src.x_val[0]) == "a very film"  # "good" is not in the training text: [UNK], dropped
    with pytest.raises(Exception, match=r"has no feature data.text_column='text'; its features are idx, sentence, label"):
        text_classify.load(compose(ENC_TINY + ["task=classify", "data.tfds_name=glue/sst2", "data.text_column=text"]).data)


def test_tfds_offline_fails_fast_in_one_line_and_writes_nothing(monkeypatch, tmp_path):
    import time
    import tensorflow_datasets as tfds
    from errors import UserError

    def fail(self, **kwargs):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nmore detail")

    def hang(self, **kwargs):  # what the real download of glue/sst2 has written when it finds no network
        for d in ("glue/sst2", "glue/.config", "downloads/extracted"):
            os.makedirs(tmp_path / "tfds" / d, exist_ok=True)
        (tmp_path / "tfds" / "glue/.config/metadata.json").write_text("{}")
        time.sleep(60)

    for fn, message, timeout in ((fail, r"could not be prepared \(Failed to resolve", 30), (hang, "did not download within 1s", 1)):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fn)
        data_dir, out = tmp_path / "tfds", tmp_path / "run"
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=message + ".*data.path=TRAIN.tsv data.val_path=DEV.tsv") as e:
            run(compose(ENC_TINY + ["task=classify", "data.tfds_name=glue/sst2", f"data.tfds_data_dir={data_dir}",
                                    f"data.download_timeout={timeout}", f"out_dir={out}"]))
        assert time.perf_counter() - t0 < 15 and "\n" not in str(e.value)
        assert not out.exists() and not (data_dir.exists() and os.listdir(data_dir))


def test_next_sentence_pairs_are_berts_and_a_pure_function_of_the_rng():
    from data import wordpiece
    from tasks import mlm
    N, L = 50, 12
    x_NL = np.zeros((N, L), np.int32)
    for i in range(N):  # sentence i: [CLS] 100+i repeated (i % 7 + 1) times [SEP]
        n = i % 7 + 1
        x_NL[i, :n + 2] = [wordpiece.CLS] + [100 + i] * n + [wordpiece.SEP]
    first = np.arange(N - 1).repeat(8)
    p = mlm.pairs(x_NL, first, np.random.default_rng([0, 7, 3]), L)
    again = mlm.pairs(x_NL, first, np.random.default_rng([0, 7, 3]), L)
    assert all((p[k] == again[k]).all() for k in p)
    assert abs(p["is_next"].mean() - 0.5) < 0.06
    for r, a in enumerate(first):
        ids, seg = p["ids"][r], p["segments"][r]
        real = ids[ids != wordpiece.PAD]
        seps = np.flatnonzero(real == wordpiece.SEP)
        assert real[0] == wordpiece.CLS and len(seps) == 2 and seps[1] == len(real) - 1 and len(real) <= L
        assert (seg[:seps[0] + 1] == 0).all() and (seg[seps[0] + 1:len(real)] == 1).all() and not seg[len(real):].any()
        a_tokens, b_tokens = real[1:seps[0]], real[seps[0] + 1:-1]
        assert set(a_tokens) == {100 + a} and len(b_tokens) >= 1
        b = b_tokens[0] - 100
        assert (b == a + 1) == bool(p["is_next"][r])
        na, nb = len(a_tokens), len(b_tokens)
        if na + nb < a % 7 + 1 + b % 7 + 1:  # cut to fit, always from the longer side (BERT's truncate_seq_pair)
            assert len(real) == L and (na == a % 7 + 1 or na >= nb - 1) and (nb == b % 7 + 1 or nb >= na)


def write_lines(path, n, seed):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8))) for _ in range(n)))
    return str(path)


def test_nsp_on_lines_trains_logs_pair_metrics_and_resumes_exactly(tmp_path):
    import jax
    from errors import UserError
    lines = write_lines(tmp_path / "lines.txt", 300, 0)
    b = ENC_TINY + ["task=mlm", "task.nsp=true", "model.type_vocab=2", "data.format=lines", f"data.path={lines}",
                    "optim.decay_steps=20"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(compose(b + [f"out_dir={whole}"]))
    run(compose(b + [f"out_dir={parts}", "steps=10"]))
    run(compose(b + [f"out_dir={parts}"]))
    for x, y in zip(jax.tree.leaves(load_run(whole).state), jax.tree.leaves(load_run(parts).state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = metrics.read(os.path.join(whole, "metrics.jsonl"))
    val = [r for r in rows if "val_loss" in r][-1]
    assert {"val_mlm_loss", "val_nsp_loss", "val_nsp_accuracy", "val_accuracy"} <= set(val)
    assert not any(k.startswith(("val_nsp_rows", "val_nsp_correct")) for k in val)
    assert val["val_loss"] == pytest.approx(val["val_mlm_loss"] + val["val_nsp_loss"])
    assert 0 <= val["val_nsp_accuracy"] <= 1 and any("train_nsp_accuracy" in r for r in rows)
    assert "nsp_head" in load_run(whole).state["params"]
    lines_cfg = [o for o in b if o not in ("task=mlm", "task.nsp=true")]
    for extra, message in ((["task=mlm", "task.nsp=true", "model.type_vocab=0"], "set model.type_vocab=2"),
                           (["task=classify"], "gives sentences here, and task=classify reads classes; use task=mlm")):
        with pytest.raises(UserError, match=message) as e:
            run(compose(lines_cfg + extra + [f"out_dir={tmp_path}/bad"]))
        assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_layer_decay_gives_each_layer_its_own_step_and_the_head_the_full_one():
    """optim.layer_decay=d: layer i of N steps lr * d^(N - i), the embeddings lr * d^(N + 1), the head lr.
    Adam's first step on a gradient of ones is lr per value, so the update shows each factor directly."""
    params = nnx.to_pure_dict(nnx.state(tiny_model(num_classes=2), nnx.Param))
    opts = ENC_TINY + ["task=classify", "data.path=x.tsv", "optim.weight_decay=0", "optim.grad_clip=0",
                       "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.01"]
    tx = make_optimizer(compose(opts + ["optim.layer_decay=0.5"]).optim, 10)
    ones = jax.tree.map(jnp.ones_like, params)
    step, _ = tx.update(ones, tx.init(params), params)
    N = 2
    np.testing.assert_allclose(np.asarray(step["blocks"]["attn"]["qkv"]["kernel"])[:, 0, 0], [-0.01 * 0.25, -0.01 * 0.5],
                               rtol=1e-4)
    np.testing.assert_allclose(np.asarray(step["blocks"]["ln1"]["scale"])[:, 0], [-0.0025, -0.005], rtol=1e-4)
    for table in ("wte", "wpe"):
        np.testing.assert_allclose(np.asarray(step[table]["embedding"]), -0.01 * 0.5 ** (N + 1), rtol=1e-4)
    for head in jax.tree.leaves([step["classifier"], step["ln_f"]]):
        np.testing.assert_allclose(np.asarray(head), -0.01, rtol=1e-4)
    off = make_optimizer(compose(opts).optim, 10)  # 1.0: plain AdamW, every value steps lr
    for leaf in jax.tree.leaves(off.update(ones, off.init(params), params)[0]):
        np.testing.assert_allclose(np.asarray(leaf), -0.01, rtol=1e-4)
    with pytest.raises(UserError, match=r"optim.layer_decay=0.0 must be in \(0, 1\]"):
        check(compose(opts + ["optim.layer_decay=0"]))


def _rows(batches, L):
    """The (tokens padded to L, label) rows of some batches, as a sorted list: what they hold, in any order."""
    return sorted((tuple(np.pad(b["x"][i], (0, L - b["x"].shape[1]))), int(b["y"][i])) for b in batches
                  for i in range(len(b["y"])))


def test_group_by_length_sorts_a_window_of_batches_and_cuts_only_padding(tmp_path):
    train, dev = write_three_classes(tmp_path / "t.tsv", 600, 0), write_three_classes(tmp_path / "d.tsv", 40, 1)
    src = text_classify.load(compose(ENC_TINY + ["task=classify", f"data.path={train}", f"data.val_path={dev}",
                                                 "data.group_by_length=30"]).data)
    B, W, L = 8, 30, src.x_train.shape[1]  # 5 to 11 tokens a row: the shortest 10 batches of a window fit in 8
    for w in (0, 2):  # 2: a window across the first epoch's end (600 rows = 2.5 windows of 240)
        grouped = [src.train_batch(7, w * W + j, B, slice(None)) for j in range(W)]
        plain = [examples.train_batch(src, 7, w * W + j, B, slice(None)) for j in range(W)]
        assert _rows(grouped, L) == _rows(plain, L)  # the window's rows, regrouped: nothing lost, nothing cut
        n = [(b["x"] != wordpiece.PAD).sum(1) for b in grouped]
        assert all(a.max() <= c.min() for a, c in zip(n, n[1:]))  # shortest first
        for block in range(0, W, 10):  # 10 steps share a length: their longest row, up to a multiple of 8
            longest = max(m.max() for m in n[block:block + 10])
            assert {b["x"].shape[1] for b in grouped[block:block + 10]} == {-(-longest // 8) * 8}
        assert [b["x"].shape[1] for b in grouped[::10]] == [8, 16, 16]
    whole, mine = src.train_batch(7, 5, B, slice(None)), src.train_batch(7, 5, B, slice(4, 8))
    again = src.train_batch(7, 5, B, slice(None))  # a pure function of (seed, step); a process builds its rows
    assert all((whole[k] == again[k]).all() and (whole[k][4:] == mine[k]).all() for k in whole)


def test_cut_batches_train_as_padded_ones_do_whatever_the_calls(tmp_path):
    """Cutting the [PAD] columns changes the cost only: without dropout the losses match the padded run's.
    And a step keeps its shape, so its dropout, whatever call it runs in: calls of 1 and of 8 steps
    (cut short where the length changes) train alike."""
    train, dev = write_three_classes(tmp_path / "t.tsv", 600, 0), write_three_classes(tmp_path / "d.tsv", 40, 1)
    b = ENC_TINY + ["task=classify", f"data.path={train}", f"data.val_path={dev}", "optim.lr=3e-3"]

    def losses(*extra):
        out = str(tmp_path / "_".join(extra).replace(".", "").replace("=", ""))
        run(compose(b + [f"out_dir={out}", *extra]))
        return [(r["step"], k, r[k]) for r in metrics.read(os.path.join(out, "metrics.jsonl"))
                for k in ("train_loss", "grad_norm", "val_loss") if k in r]

    cut = ("steps=10", "model.dropout=0.0")  # calls of any length: the second pair
    padded = losses(*cut, "data.group_by_length=0")
    assert padded[3][2] < padded[0][2]  # it trains: train_loss at step 10 under step 5's
    calls = ("steps=30", "log_every=15", "eval_every=30", "ckpt_every=30", "data.group_by_length=37")
    for a, c in ((padded, losses(*cut, "data.group_by_length=1")),  # 1: each batch's own rows, cut
                 (losses(*calls, "steps_per_call=1"), losses(*calls, "steps_per_call=8"))):  # 8, 8, 16: 15-22 splits
        assert [r[:2] for r in a] == [r[:2] for r in c] and len(a) >= 4
        np.testing.assert_allclose([r[2] for r in c], [r[2] for r in a], rtol=1e-5)


def test_group_by_length_is_refused_where_it_cannot_apply(tmp_path):
    train = write_three_classes(tmp_path / "t.tsv", 100, 0)
    opts = ENC_TINY + [f"data.path={train}", f"out_dir={tmp_path}/bad"]
    for extra, message in ((["task=mlm", "data.group_by_length=50"], "data.group_by_length is for task=classify"),
                           (["task=classify", "data.group_by_length=-1"], "must be 0 .off. or a number of batches")):
        with pytest.raises(UserError, match=message) as e:
            run(compose(opts + extra))
        assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_a_fine_tune_keeps_its_own_labels_whatever_the_pretraining_file_had(tmp_path):
    # Pretrained on unlabelled lines, or on a table whose labels are other strings, the fine-tune
    # classifies its own file's labels: only a classifier's labels carry over.
    rng = random.Random(0)
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(" ".join(rng.choice(FILLER) for _ in range(6)) + "\n" for _ in range(80)))
    table = tmp_path / "pos_neg.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"{' '.join(rng.choice(FILLER) for _ in range(6))}\t"
                                                   f"{rng.choice(['pos', 'neg'])}\n" for _ in range(80)))
    ids = tmp_path / "ids.tsv"
    ids.write_text("sentence\tlabel\n" + "".join(f"{' '.join(rng.choice(FILLER) for _ in range(6))}\t{i % 2}\n"
                                                 for i in range(80)))
    tiny = ENC_TINY + ["steps=2", "eval_every=2", "ckpt_every=2", "eval_batches=1"]
    for name, extra in (("lines", ["data.format=lines", f"data.path={lines}"]), ("table", [f"data.path={table}"])):
        mlm_run = str(tmp_path / f"mlm_{name}")
        run(compose(tiny + ["task=mlm", f"out_dir={mlm_run}"] + extra))
        out = str(tmp_path / f"ft_{name}")
        run(compose(tiny + ["task=classify", f"data.path={ids}", f"init_from={mlm_run}", f"out_dir={out}"]))
        assert load_run(out).meta["labels"] == [0, 1]
    with pytest.raises(UserError, match=r"the training data has labels 'neg', 'pos' that the labels of the run it starts from or distils \(init_from, distill.teacher\) \(0, 1\)"):
        run(compose(tiny + ["task=classify", f"data.path={table}", f"init_from={out}", f"out_dir={tmp_path}/x"]))
