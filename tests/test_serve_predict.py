"""POST /v1/predict: table rows over real HTTP; images (lists, PNG) and texts through the same predictor."""
import base64
import io
import json
import threading

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose, run_cli
from core.loop import run
from core.state import load_run
from errors import UserError
from serving.metrics import Metrics
from serving.predictor import Predictor, kind_of, to_rows
from test_encoder import ENC_TINY, write_sentiment
from test_families import CNN_TINY, quadrant_images
from test_serve import Server
from test_tabular import TAB, sine_table


def train(tmp_path_factory, overrides, name):
    out = str(tmp_path_factory.mktemp(name) / "run")
    run(compose(overrides + [f"out_dir={out}", "steps=10", "eval_every=10", "ckpt_every=10"]))
    return load_run(out), out


def direct(run, x_N):
    """The model's outputs on rows already preprocessed, outside the server."""
    return np.asarray(run.model(jnp.asarray(x_N)))


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    path = sine_table(tmp_path_factory.mktemp("table") / "t.csv")
    out = str(tmp_path_factory.mktemp("tab") / "run")
    run(compose(TAB + [f"data.path={path}", "data.target=y", f"out_dir={out}", "steps=10", "eval_every=10",
                       "ckpt_every=10"]))
    return out


def test_table_rows_over_http_equal_the_model_and_mistakes_are_400(table_run):
    from data import tabular

    server = Server(f"out_dir={table_run}", "predict_rows=8", "batch_wait_ms=20")
    try:
        rows = [{"x1": 0.1 * i, "x2": -0.5 + 0.1 * i} for i in range(5)]
        got = httpx.post(f"{server.url}/v1/predict", json={"inputs": rows}).json()["predictions"]
        runner = load_run(table_run)
        x_NF = tabular.encode({k: np.array([str(r[k]) for r in rows]) for k in ("x1", "x2")}, runner.meta, "t")[0]
        y_N = direct(runner, x_NF)[:, 0] * runner.meta["target_std"][0] + runner.meta["target_mean"][0]
        np.testing.assert_allclose([p["prediction"] for p in got], y_N, rtol=1e-5, atol=1e-6)

        results = [None] * 6  # concurrent requests: one batch, each its own rows back
        def ask(i):
            results[i] = httpx.post(f"{server.url}/v1/predict", json={"inputs": rows[i % 5:i % 5 + 1]}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_allclose([r["predictions"][0]["prediction"] for r in results],
                                   [got[i % 5]["prediction"] for i in range(6)], rtol=1e-5)  # batch shapes differ
        assert server.metric('serve_batch_size_bucket{le="1.0"}') < server.metric("serve_batch_size_count")

        for body, words in [({"inputs": [{"x1": 1}]}, "lacks x2"), ({"inputs": [[1, 2]]}, "object of feature"),
                            ({"inputs": [{"x1": [1], "x2": 2}]}, "number, a string or null"),
                            ({"inputs": [{"x1": 1, "x2": 2, "x3": 3}]}, "'x3', not a column"),
                            ({"inputs": []}, "non-empty"), ({"inputs": [rows[0]] * 9}, "at most 8"),
                            ({"rows": rows}, "unknown field")]:
            r = httpx.post(f"{server.url}/v1/predict", json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"})
        assert r.status_code == 404 and "/v1/predict" in r.json()["error"]["message"]
        missing = httpx.post(f"{server.url}/v1/predict", json={"inputs": [{"x1": None, "x2": 0.3}]})
        assert missing.status_code == 200  # a missing cell reads as the training mean, as predict.py does
    finally:
        assert server.stop() == 0


def predicted(run, x_N, max_rows: int) -> list:
    """The server's predictor thread's answer for rows x_N, in-process."""
    predictor = Predictor(run, max_rows=max_rows, max_queue=4, wait_s=0, metrics=Metrics())
    predictor.start()
    try:
        return predictor.submit(x_N).result(timeout=60)
    finally:
        predictor.stop()


def png(image_HWC: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_images_as_lists_or_png_and_texts_predict_as_the_model_does(tmp_path_factory):
    images = quadrant_images(tmp_path_factory.mktemp("img") / "q.npz")
    cnn, cnn_dir = train(tmp_path_factory, CNN_TINY + [f"data.path={images}"], "cnn")
    x = np.load(images)["x"][:3]
    assert kind_of(cnn) == "image"
    as_lists, as_png = to_rows(cnn, "image", x.tolist()), to_rows(cnn, "image", [png(i) for i in x])
    np.testing.assert_array_equal(as_lists, as_png)
    got = predicted(cnn, as_lists, max_rows=4)
    logits = direct(cnn, as_lists)
    assert [g["label"] for g in got] == list(logits.argmax(-1))
    np.testing.assert_allclose([g["probs"]["0"] for g in got],
                               np.exp(logits[:, 0]) / np.exp(logits).sum(-1), rtol=1e-5)
    with pytest.raises(UserError, match=r"shape \[5, 5, 3\]"):
        to_rows(cnn, "image", [np.zeros((5, 5, 3)).tolist()])
    with pytest.raises(UserError, match="base64 PNG"):
        to_rows(cnn, "image", ["not an image"])
    with pytest.raises(UserError, match="not finite numbers"):  # JSON's 1e999 is inf: no NaN probabilities back
        to_rows(cnn, "image", [np.full(x.shape[1:], np.inf).tolist()])
    folder = tmp_path_factory.mktemp("npy")
    for name, bad in (("inf.npy", np.full((2, *x.shape[1:]), np.inf, np.float32)), ("empty.npy", x[:0])):
        np.save(folder / name, bad)
        cli = run_cli("predict.py", f"out_dir={cnn_dir}", f"path={folder / name}")
        assert cli.returncode == 2 and not cli.stdout and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert ("not finite numbers" if name == "inf.npy" else "holds 0 images") in cli.stderr

    d = tmp_path_factory.mktemp("sst")
    train_tsv, dev_tsv = write_sentiment(d / "train.tsv", 300, 0), write_sentiment(d / "dev.tsv", 50, 1)
    enc, enc_dir = train(tmp_path_factory, ENC_TINY + ["task=classify", f"data.path={train_tsv}", f"data.val_path={dev_tsv}"],
                "enc")
    assert kind_of(enc) == "text"
    ids = to_rows(enc, "text", ["a good movie", "the plot was awful"])
    np.testing.assert_allclose(np.asarray(enc.model(ids)), direct(enc, ids), rtol=1e-6)  # numpy ids, as reload.md
    got = predicted(enc, ids, max_rows=2)
    assert [g["label"] for g in got] == [enc.meta["labels"][i] for i in direct(enc, ids).argmax(-1)]
    with pytest.raises(UserError, match="non-empty string"):
        to_rows(enc, "text", [3])
    cli = run_cli("predict.py", f"out_dir={enc_dir}", "text=a good movie")
    assert cli.returncode == 0 and json.loads(cli.stdout)["label"] == got[0]["label"], cli.stderr
