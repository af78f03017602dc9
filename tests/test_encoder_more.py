"""data=text_classify and task=mlm beyond the basics: macro F1 over 3 classes, TFDS input, next-sentence prediction."""
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from core import metrics
from core.loop import run
from core.state import load_run
from data import text_classify
from test_encoder import ENC_TINY, FILLER

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
