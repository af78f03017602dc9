"""Text data: batches are pure functions of (seed, step); splits, vocab and TFDS behave as documented."""
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import OmegaConf

from conftest import compose, make_text
from errors import UserError
from data import text


def data_cfg(**data):
    """The debug experiment's data config with `data` overrides."""
    return OmegaConf.merge(compose(["+experiment=debug"]).data, {"path": None, **data})


def test_batches_are_a_pure_function_of_seed_and_step_and_rows_partition_them(tmp_path):
    from tasks import lm

    path = tmp_path / "t.txt"
    path.write_text(make_text(5000))
    cfg = data_cfg(path=str(path))
    corpus = text.load(cfg)
    feed = lambda seed, rows=slice(0, 8): lm.feed(corpus, cfg, seed=seed, batch_size=8, rows=rows,  # noqa: E731
                                                  eval_batches=2)
    full = feed(3).train_batch(17)
    np.testing.assert_array_equal(full["x"], feed(3).train_batch(17)["x"])
    halves = [feed(3, slice(i * 4, i * 4 + 4)).train_batch(17) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), full["x"])
    np.testing.assert_array_equal(full["x"][:, 1:], full["y"][:, :-1])  # targets are inputs shifted by one
    assert full["x"].shape == (8, cfg.seq_len)
    assert not np.array_equal(feed(3).train_batch(18)["x"], full["x"])
    assert not np.array_equal(feed(4).train_batch(17)["x"], full["x"])
    # Validation batches do not depend on the run's seed: runs with different seeds compare fairly.
    (val3, w3), (val4, w4) = feed(3).eval_batch(0), feed(4).eval_batch(0)
    np.testing.assert_array_equal(val3["x"], val4["x"])
    assert w3 == w4 == 8
    assert not np.array_equal(feed(3).eval_batch(1)[0]["x"], val3["x"])


def test_local_file_split_and_vocab(tmp_path):
    path = tmp_path / "t.txt"
    body = "abcabcabc" * 100
    path.write_text(body + "xyz" * 10)  # 'xyz' only in the last 10%
    corpus = text.load(data_cfg(path=str(path), val_fraction=0.1))
    assert corpus.vocab == "abc"  # vocab from the training part only
    assert len(corpus.train_T) == int(len(body + "xyz" * 10) * 0.9)
    assert text.decode(corpus.train_T[:6], corpus.vocab) == "abcabc"
    with pytest.raises(UserError, match="not in the model's vocabulary"):
        text.encode("abz", corpus.vocab)


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_files_are_user_errors(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        text.load(data_cfg(path=str(path)))


def test_shipped_tiny_shakespeare_is_the_default():
    corpus = text.load(data_cfg())
    assert corpus.vocab_size == 65 and len(corpus.train_T) + len(corpus.val_T) == 1_115_394
    assert text.decode(corpus.train_T[:14], corpus.vocab) == "First Citizen:"


def test_tfds_text_dataset_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=1):
        corpus = text.load(data_cfg(tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path)))
    assert corpus.vocab_size > 1 and len(corpus.train_T) > 0 and len(corpus.val_T) > 0


def test_tfds_download_that_hangs_gives_up_with_a_hint(monkeypatch, tmp_path):
    def hang(self, **kwargs):
        time.sleep(60)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", hang)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="did not download within 1s.*data.path=/path/to/input.txt"):
        text.load(data_cfg(tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path), download_timeout=1))
    assert time.perf_counter() - t0 < 10


def test_a_timed_out_download_leaves_no_partial_files(monkeypatch, tmp_path):
    def hang(self, **kwargs):
        os.makedirs(os.path.join(str(tmp_path), "tiny_shakespeare", "incomplete.ABC_1.0.0"))
        os.makedirs(os.path.join(str(tmp_path), "downloads", "tiny_shakespeare"))
        open(os.path.join(str(tmp_path), "downloads", "tiny_shakespeare", "file.tar.gz.tmp.123"), "w").close()
        time.sleep(60)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", hang)
    with pytest.raises(UserError, match="did not download within 1s"):
        text.load(data_cfg(tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path), download_timeout=1))
    leftovers = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert leftovers == [] and not os.path.exists(tmp_path / "tiny_shakespeare")


def test_a_download_still_writing_after_the_deadline_leaves_nothing_behind(monkeypatch, tmp_path):
    """The download is stopped before its partial files are removed, so none appear afterwards."""
    def slow(self, **kwargs):
        time.sleep(1.5)  # past the deadline, then a partial write
        os.makedirs(os.path.join(str(tmp_path), "tiny_shakespeare", "incomplete.XYZ_1.0.0"))

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", slow)
    with pytest.raises(UserError, match="did not download within 1s"):
        text.load(data_cfg(tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path), download_timeout=1))
    time.sleep(1.5)
    assert not os.path.exists(tmp_path / "tiny_shakespeare")


def test_a_failed_download_is_one_line_naming_the_cause(monkeypatch, tmp_path):
    def fail(self, **kwargs):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'\nmore detail")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(UserError, match=r"could not be prepared \(Failed to resolve 'storage.googleapis.com'\)") as e:
        text.load(data_cfg(tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path), download_timeout=30))
    assert "\n" not in str(e.value)
