"""model=encoder, data=text_classify, task=mlm: BERT-style pretraining, then fine-tuning through init_from."""
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compose, run_cli
from core import metrics
from core.config import check
from core.loop import run
from core.optim import decay_mask
from core.state import load_run
from data import text_classify, wordpiece
from errors import UserError
from model import build
from tasks import mlm

ENC_TINY = ["model=encoder", "data=text_classify", "model.n_layers=2", "model.n_heads=2", "model.d_model=32",
            "data.seq_len=24", "data.vocab_size=120", "batch_size=16", "steps=20", "eval_every=10", "ckpt_every=10",
            "log_every=5", "eval_batches=4", "progress=false", "mesh.data=1", "optim.warmup_steps=2"]
FILLER = "the a movie film story plot actors was is and it this very really quite with of".split()
GOOD, BAD = "good great wonderful fine".split(), "bad awful terrible boring".split()


def write_sentiment(path, n, seed):
    """Sentences of filler words around one good (label 1) or bad (label 0) word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for _ in range(n):
            y = rng.randint(0, 1)
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
            words.insert(rng.randint(0, len(words)), rng.choice(GOOD if y else BAD))
            f.write(" ".join(words) + f"\t{y}\n")
    return str(path)


@pytest.fixture(scope="module")
def tsvs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentiment")
    return write_sentiment(d / "train.tsv", 2000, 0), write_sentiment(d / "dev.tsv", 200, 1)


def base(tsvs, task):
    return ENC_TINY + [f"task={task}", f"data.path={tsvs[0]}", f"data.val_path={tsvs[1]}"]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, tsvs):
    """A tiny masked-LM pretraining, once per module."""
    out = str(tmp_path_factory.mktemp("mlm") / "run")
    run(compose(base(tsvs, "mlm") + [f"out_dir={out}", "steps=80", "eval_every=40", "ckpt_every=40",
                                      "optim.lr=3e-3", "model.dropout=0.0"]))
    return out


def tiny_model(num_classes=None, **cfg):
    c = compose(ENC_TINY + [f"model.{k}={v}" for k, v in cfg.items()]).model
    dims = {"vocab_size": 50} | ({} if num_classes is None else {"num_classes": num_classes})
    return build(c, dims, rngs=nnx.Rngs(0))


def test_wordpiece_is_deterministic_round_trips_and_numbers_the_specials():
    texts = [" ".join(random.Random(i).choices(FILLER + GOOD + BAD, k=8)) for i in range(300)]
    tok = wordpiece.train(texts, 200)
    assert tok == wordpiece.train(texts, 200)  # exact resume compares it in the run's meta
    t = wordpiece.load(tok)
    assert [t.token_to_id(s) for s in wordpiece.SPECIALS] == [0, 1, 2, 3, 4]
    from model import wordpiece_ids as ids  # the models' copy of the numbering
    assert (wordpiece.PAD, wordpiece.UNK, wordpiece.CLS, wordpiece.SEP, wordpiece.MASK) == \
        (ids.PAD_ID, ids.UNK_ID, ids.CLS_ID, ids.SEP_ID, ids.MASK_ID) and ids.FIRST_WORD_ID == len(wordpiece.SPECIALS)
    assert t.get_vocab_size() == wordpiece.vocab_size(tok) <= 200
    ids_NL, cut = wordpiece.encode(tok, ["The Movie was GOOD", texts[1], "x " * 40], 16)
    assert ids_NL.shape == (3, 16) and ids_NL.dtype == np.int32 and cut == 1
    n = int((ids_NL[0] != 0).sum())
    assert ids_NL[0, 0] == wordpiece.CLS and ids_NL[0, n - 1] == wordpiece.SEP and not ids_NL[0, n:].any()
    assert wordpiece.decode(tok, ids_NL[0]) == "the movie was good"  # lower-cased, specials dropped
    assert wordpiece.decode(tok, ids_NL[1]) == texts[1]
    assert t.encode("the movie").ids == list(ids_NL[0, :3]) + [wordpiece.SEP]  # the JSON alone adds [CLS]/[SEP]


def test_masking_is_berts_80_10_10_of_15_percent_and_a_pure_function_of_seed_and_step():
    rng = np.random.default_rng(0)
    V, B, L = 1000, 512, 64
    ids = rng.integers(5, V, (B, L)).astype(np.int32)
    n_real = rng.integers(3, L, B)
    ids[np.arange(L)[None] >= n_real[:, None]] = wordpiece.PAD
    ids[:, 0] = wordpiece.CLS
    ids[np.arange(B), n_real - 1] = wordpiece.SEP
    b = mlm.mask_batch(ids, 7, 5, 3, B, slice(None), V)
    chosen = b["w"] > 0
    maskable = ids > wordpiece.SEP
    assert not (chosen & ~maskable).any() and (b["y"] == ids).all()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    x = b["x"][chosen]
    assert abs(np.mean(x == wordpiece.MASK) - 0.8) < 0.02
    assert abs(np.mean(x == ids[chosen]) - 0.1) < 0.02  # kept (a random token equal to it is rare)
    randomised = (x != wordpiece.MASK) & (x != ids[chosen])
    assert abs(np.mean(randomised) - 0.1) < 0.02 and (x[randomised] >= 5).all()  # never a special token
    assert (b["x"][~chosen] == ids[~chosen]).all()
    again = mlm.mask_batch(ids, 7, 5, 3, B, slice(None), V)
    assert all((b[k] == again[k]).all() for k in b)
    assert not (mlm.mask_batch(ids, 7, 5, 4, B, slice(None), V)["w"] == b["w"]).all()  # another step
    rows = slice(128, 256)  # one process's rows: the same masks as the global batch's
    part = mlm.mask_batch(ids[rows], 7, 5, 3, B, rows, V)
    assert all((part[k] == b[k][rows]).all() for k in b)


def test_mask_prob_sets_the_rate_and_the_scored_positions_list_every_chosen_one_first():
    rng = np.random.default_rng(1)
    V, B, L = 1000, 256, 64
    ids = rng.integers(5, V, (B, L)).astype(np.int32)
    assert mlm.max_predictions(L) == 16 and mlm.max_predictions(L, 0.4) == 43  # BERT's L/4 at 15%
    for p in (0.15, 0.4):
        b = mlm.mask_batch(ids, 3, 5, 0, B, slice(None), V, p)
        assert abs(b["w"].mean() - p) < 0.01 and b["pos"].shape == (B, mlm.max_predictions(L, p))
        w_BP = np.take_along_axis(b["w"], b["pos"], axis=1)
        assert (w_BP.sum(1) == b["w"].sum(1)).all()  # every chosen position is among the scored ones
        assert (np.diff(w_BP, axis=1) <= 0).all()  # chosen first, then weight-0 fillers
        assert len(set(b["pos"][0])) == b["pos"].shape[1]


def test_packing_puts_k_sentences_in_a_row_and_one_process_builds_its_rows_only(tmp_path, tsvs):
    ids = np.array([[2, 7, 8, 3, 0, 0], [2, 9, 3, 0, 0, 0], [2, 5, 6, 7, 8, 3], [2, 6, 3, 0, 0, 0]], np.int32)
    assert mlm.pack(ids, 2).tolist() == [[2, 7, 8, 3, 9, 3], [2, 5, 6, 7, 8, 3]]  # cut to L
    cfg = compose(base(tsvs, "mlm") + ["data.pack=3"])
    src = text_classify.load(cfg.data)
    whole = mlm.feed(src, cfg.data, seed=0, batch_size=8, rows=slice(0, 8), eval_batches=2)
    half = mlm.feed(src, cfg.data, seed=0, batch_size=8, rows=slice(4, 8), eval_batches=2)
    a, b = whole.train_batch(5), half.train_batch(5)
    assert all((a[k][4:] == b[k]).all() for k in a) and whole.units_per_example == 3
    assert ((a["y"] == wordpiece.CLS).sum(1) == 1).all() and ((a["y"] == wordpiece.SEP).sum(1) >= 2).all()
    batch, w = whole.eval_batch(0)
    assert ((batch["y"] == wordpiece.SEP).sum(1) == 1).all() and w == batch["w"].sum() > 0  # one sentence a row


def test_the_mlm_loss_reads_masked_positions_only():
    model = tiny_model()
    ids = np.random.default_rng(1).integers(5, 50, (4, 24)).astype(np.int32)
    ids[:, 0] = wordpiece.CLS
    batch = {k: jnp.asarray(v) for k, v in mlm.mask_batch(ids, 0, 5, 0, 4, slice(None), 50).items()}
    loss, m = mlm.loss(model, batch, None)
    w = np.asarray(batch["w"])
    (r0, c0), (r1, c1) = np.argwhere(w == 0)[1], np.argwhere(w > 0)[0]
    y = np.asarray(batch["y"])
    unmasked, masked = y.copy(), y.copy()
    unmasked[r0, c0] = (y[r0, c0] + 1) % 50
    masked[r1, c1] = (y[r1, c1] + 1) % 50
    assert float(mlm.loss(model, {**batch, "y": jnp.asarray(unmasked)}, None)[0]) == float(loss)
    assert float(mlm.loss(model, {**batch, "y": jnp.asarray(masked)}, None)[0]) != float(loss)
    logits_BLV = model(batch["x"])  # the gathered head equals the full one at the masked positions
    ce = -jax.nn.log_softmax(logits_BLV)[np.arange(4)[:, None], np.arange(24), y]
    np.testing.assert_allclose(float(loss), float((ce * w).sum() / w.sum()), rtol=1e-5)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_attention_is_bidirectional_and_padding_changes_no_real_output(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    assert (model.wpe is None) == (pos_emb == "rope")  # rotary positions need no table
    ids = np.random.default_rng(2).integers(5, 50, (2, 10)).astype(np.int32)
    later = ids.copy()
    later[:, 7] = (ids[:, 7] + 1) % 45 + 5
    out, out_later = np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(later)))
    assert not np.allclose(out[:, 2], out_later[:, 2])  # position 2 sees position 7
    padded = np.zeros((3, 16), np.int32)  # longer rows and an extra row: only [PAD] added
    padded[:2, :10] = ids
    padded[2, :4] = ids[0, :4]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(padded)))[:2, :10], out, atol=2e-5)
    for pooling in ("cls", "mean"):
        clf = tiny_model(num_classes=3, pooling=pooling, pos_emb=pos_emb)
        np.testing.assert_allclose(np.asarray(clf(jnp.asarray(padded)))[:2], np.asarray(clf(jnp.asarray(ids))),
                                   atol=2e-5)
    assert np.isfinite(np.asarray(model(jnp.zeros((1, 8), jnp.int32)))).all()  # a row of nothing but [PAD]


def test_word_dropout_masks_words_in_training_only_and_keeps_the_special_tokens():
    ids = np.array([[2, 7, 9, 11, 13, 3, 0, 0]], np.int32)  # [CLS] four words [SEP] [PAD] [PAD]
    plain, dropping = tiny_model(num_classes=2, dropout=0.0), tiny_model(num_classes=2, dropout=0.0, word_dropout=0.999)
    np.testing.assert_array_equal(np.asarray(dropping(jnp.asarray(ids))), np.asarray(plain(jnp.asarray(ids))))
    masked = np.where(ids >= 5, 4, ids)  # every word [MASK]; [CLS], [SEP] and [PAD] as they were
    np.testing.assert_allclose(np.asarray(dropping(jnp.asarray(ids), key=jax.random.key(0))),
                               np.asarray(plain(jnp.asarray(masked))), atol=1e-5)
    with pytest.raises(UserError, match="word_dropout"):
        check(compose(ENC_TINY + ["task=classify", "data.path=x.tsv", "model.word_dropout=1.0"]))


def test_body_params_share_paths_between_heads_and_weight_decay_skips_vectors():
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
    lm, clf = pure(tiny_model()), pure(tiny_model(num_classes=2))
    assert {k for k in lm if k != "mlm_head"} == {k for k in clf if k != "classifier"} == {"wte", "wpe", "blocks", "ln_f"}
    mask = decay_mask(lm)
    assert mask["wte"]["embedding"] and mask["wpe"]["embedding"] and mask["mlm_head"]["dense"]["kernel"]
    assert mask["blocks"]["attn"]["qkv"]["kernel"] and mask["blocks"]["mlp"]["fc"]["kernel"]
    assert not any(jax.tree.leaves([mask["blocks"]["attn"]["qkv"]["bias"], mask["blocks"]["ln1"], mask["blocks"]["ln2"],
                                    mask["ln_f"], mask["mlm_head"]["bias"], mask["mlm_head"]["ln"],
                                    mask["mlm_head"]["dense"]["bias"]]))
    mask = decay_mask(clf)
    assert mask["classifier"]["kernel"] and not mask["classifier"]["bias"]


@pytest.mark.parametrize("task", ["mlm", "classify"])
def test_resume_equals_uninterrupted_bitwise(task, tmp_path, tsvs):
    b = base(tsvs, task) + ["model.dropout=0.1", "optim.decay_steps=20"]  # the schedule must not depend on the stop
    b += ["data.pack=2"] if task == "mlm" else ["data.group_by_length=3"]  # the recipes' settings
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(compose(b + [f"out_dir={whole}"]))
    run(compose(b + [f"out_dir={parts}", "steps=10"]))
    assert run(compose(b + [f"out_dir={parts}"]))["step"] == 20
    a, c = load_run(whole).state, load_run(parts).state
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda d: [{k: v for k, v in r.items() if k != "time_s" and not k.endswith("_per_s")}  # noqa: E731
                       for r in metrics.read(os.path.join(d, "metrics.jsonl"))]
    assert strip(whole) == strip(parts) and any("val_accuracy" in r for r in strip(whole))


def test_init_from_loads_the_body_and_leaves_a_fresh_classifier(mlm_run, tmp_path, tsvs, capsys):
    out = str(tmp_path / "ft")
    capsys.readouterr()
    run(compose(base(tsvs, "classify") + [f"out_dir={out}", f"init_from={mlm_run}", "steps=1", "optim.lr=1e-12",
                                          "optim.min_lr=0", "optim.warmup_steps=0"]))
    logged = capsys.readouterr().err
    assert "fresh: classifier/bias, classifier/kernel" in logged and "not used: mlm_head/" in logged
    src, new = load_run(mlm_run), load_run(out)
    assert new.meta["tokenizer"] == src.meta["tokenizer"] and "(read from another run)" in logged
    s, n = src.state["params"], new.state["params"]
    for k in ("wte", "wpe", "blocks", "ln_f"):
        for x, y in zip(jax.tree.leaves(s[k]), jax.tree.leaves(n[k]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert "mlm_head" not in n and "classifier" not in s
    fresh = load_run(out).state["params"]["classifier"]["kernel"]
    scratch = str(tmp_path / "scratch")  # the same head as a run from random init starts with
    run(compose(base(tsvs, "classify") + [f"out_dir={scratch}", "steps=1", "optim.lr=1e-12", "optim.min_lr=0",
                                          "optim.warmup_steps=0"]))
    np.testing.assert_allclose(np.asarray(fresh), np.asarray(load_run(scratch).state["params"]["classifier"]["kernel"]),
                               atol=1e-6)


def test_a_fine_tune_started_with_init_from_resumes_with_the_inherited_tokenizer(mlm_run, tmp_path, tsvs):
    other = write_sentiment(tmp_path / "other.tsv", 500, 2)  # other text: a tokenizer of its own would differ
    b = base(tsvs, "classify")[:-2] + [f"data.path={other}", f"data.val_path={tsvs[1]}", f"init_from={mlm_run}",
                                       "optim.decay_steps=20", "steps=20"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(compose(b + [f"out_dir={whole}"]))
    run(compose(b + [f"out_dir={parts}", "steps=10"]))
    assert run(compose(b + [f"out_dir={parts}"]))["step"] == 20
    for x, y in zip(jax.tree.leaves(load_run(whole).state), jax.tree.leaves(load_run(parts).state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pretrain_then_fine_tune_learns_the_sentiment_words(mlm_run, tmp_path, tsvs):
    rows = [r for r in metrics.read(os.path.join(mlm_run, "metrics.jsonl")) if "val_loss" in r]
    base_row = next(r for r in metrics.read(os.path.join(mlm_run, "metrics.jsonl")) if "baseline_unigram_loss" in r)
    assert rows[-1]["val_loss"] < base_row["baseline_unigram_loss"]  # beats guessing from token frequencies
    assert "baseline_accuracy" not in base_row  # the TSV's label majority says nothing of masked tokens
    out = str(tmp_path / "ft")
    result = run(compose(base(tsvs, "classify") + [f"out_dir={out}", f"init_from={mlm_run}", "steps=60",
                                                   "eval_every=30", "optim.lr=3e-3", "optim.schedule=linear",
                                                   "eval_batches=20"]))
    val = [r for r in metrics.read(os.path.join(result["out_dir"], "metrics.jsonl")) if "val_accuracy" in r]
    assert val[-1]["val_accuracy"] > 0.8 and val[-1]["step"] == 60


def test_the_experiments_compose_for_their_documented_commands():
    for name, extra in (("sst2_mlm", []), ("sst2_encoder", ["init_from=runs/sst2_mlm"]), ("sst2_encoder_scratch", [])):
        cfg = compose([f"+experiment={name}", "data.path=train.tsv", "data.val_path=dev.tsv"] + extra)
        check(cfg)
        assert cfg.model.family == "encoder" and cfg.data.kind == "text_classify"
    mlm_cfg, ft_cfg = compose(["+experiment=sst2_mlm"]), compose(["+experiment=sst2_encoder"])
    assert mlm_cfg.task.name == "mlm" and ft_cfg.task.name == "classify"
    body = lambda c: {k: v for k, v in c.model.items() if k not in ("dropout", "pooling")}  # noqa: E731
    assert body(mlm_cfg) == body(ft_cfg) == body(compose(["+experiment=sst2_encoder_scratch"]))


def _table(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, tsvs, trained_run):
    train = tsvs[0]
    files = {name: _table(tmp_path, name, text) for name, text in (
        ("empty.tsv", ""), ("head.tsv", "sentence\tlabel\n"), ("frac.tsv", "sentence\tlabel\na b\t0.5\nc d\t1\n"),
        ("nolabel.tsv", "sentence\tlabel\na b\t\nc d\t1\n"), ("dev3.tsv", "sentence\tlabel\na b\t2\n"))}
    cases = [
        (["data.path=/nonexistent/train.tsv"], r"data.path=/nonexistent/train.tsv does not exist"),
        ([f"data.path={tmp_path}"], "is a directory; pass a TSV/CSV file"),
        ([f"data.path={files['empty.tsv']}"], "holds no rows"),
        ([f"data.path={files['head.tsv']}"], "holds no rows"),
        (["data.text_column=text"], r"no column data.text_column='text'; its columns are sentence, label"),
        (["data.header=false"], r"no column data.text_column='sentence' \(data.header=false: columns are numbered"),
        ([f"data.path={files['frac.tsv']}"], "is a fraction"),
        ([f"data.path={files['nolabel.tsv']}"], "line 2 has no label"),
        ([f"data.val_path={files['dev3.tsv']}"], r"the validation data has labels 2 that the training labels \(0, 1\) lack"),
        (["data.seq_len=32", "model.block_size=16"], "data.seq_len=32 is longer than the model's model.block_size=16"),
        ([f"init_from={trained_run}"], "holds a model=transformer run, and this run trains model=encoder"),
        (["task.mask_prob=1.0"], r"task.mask_prob=1.0 is the share of tokens masked: use a value in \(0, 1\)"),
        (None, r"model=cnn cannot train task=mlm \(it does classify\); use model=encoder"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        args = base(tsvs, "mlm") + overrides if overrides is not None else \
            ["model=cnn", "data=text_classify", "task=mlm", f"data.path={train}"]
        with pytest.raises(UserError, match=message) as e:
            run(compose(args + [f"out_dir={out}"]))
        assert "\n" not in str(e.value) and not out.exists(), overrides


def test_a_headerless_csv_reads_columns_by_index_and_splits_off_validation(tmp_path):
    path = _table(tmp_path, "t.csv", "".join(f'"{w} {w}, ok",{"pos" if i % 3 else "neg"}\n'
                                             for i, w in enumerate(FILLER * 5)))
    cfg = compose(ENC_TINY + ["task=classify", f"data.path={path}", "data.header=false", "data.text_column=0",
                              "data.label_column=1", "data.val_fraction=0.2"]).data
    src = text_classify.load(cfg)
    assert src.labels == ["neg", "pos"] and len(src.x_val) == 17 and len(src.x_train) == 68  # 85 rows
    assert src.dims == {"vocab_size": src.vocab_size, "num_classes": 2}
    batch, n = src.eval_batch(1, 10, slice(None))
    assert n == 7 and batch["mask"].tolist() == [1] * 7 + [0] * 3
    assert (src.train_batch(0, 3, 8, slice(None))["x"] == src.train_batch(0, 3, 8, slice(None))["x"]).all()


def test_drop_subphrases_keeps_the_rows_no_longer_row_contains(tmp_path):
    rows = ["a b c", "b c", "c", "d", "b c", "x b", "c a", "a b c", "b"]
    texts, cells = text_classify.maximal_phrases(rows, list(range(len(rows))))
    assert texts == ["a b c", "d", "x b", "c a"] and cells == [0, 3, 5, 6]  # file order; "c a" spans no row
    path = tmp_path / "phrases.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows * 3)))
    cfg = compose(ENC_TINY + ["task=mlm", f"data.path={path}", "data.drop_subphrases=true",
                              "data.val_fraction=0.25"]).data
    src = text_classify.load(cfg)
    assert len(src.x_train) + len(src.x_val) == 4  # duplicates once, before the split
    with pytest.raises(UserError, match="data.format=lines keeps every line in order"):
        text_classify.load(compose(ENC_TINY + ["task=mlm", f"data.path={path}", "data.drop_subphrases=true",
                                               "data.format=lines"]).data)


def test_train_py_runs_the_documented_from_scratch_command(tmp_path, tsvs):
    proc = run_cli("train.py", "model=encoder", "data=text_classify", "task=classify", f"data.path={tsvs[0]}",
                   f"data.val_path={tsvs[1]}", *ENC_TINY[2:], "steps=4", f"out_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train.py", "model=encoder", "data=text_classify", "task=mlm", "data.path=/no/such.tsv")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
