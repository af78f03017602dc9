"""Image and series data: batches are pure functions of (seed, step); epochs, augmentation, .npz formats."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose
from errors import UserError
from data import images, series


def images_cfg(path, **data):
    return OmegaConf.merge(compose(["model=cnn", "data=images", "task=classify"]).data, {"path": str(path), **data})


@pytest.fixture
def digits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 255, (50, 6, 5, 3), np.uint8), y_train=np.arange(50) % 5,
             x_test=rng.integers(0, 255, (13, 6, 5, 3), np.uint8), y_test=np.arange(13) % 5)
    return images.load(images_cfg(path))


def test_every_example_once_per_epoch_in_an_order_keyed_on_seed_and_epoch(digits):
    n, B = len(digits.x_train), 8
    stream = np.concatenate([images.train_indices(n, 7, step, B) for step in range(2 * n // B + 1)])
    np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))  # epoch 0 (batch 6 straddles into 1)
    np.testing.assert_array_equal(np.sort(stream[n:2 * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # each epoch its own order
    np.testing.assert_array_equal(images.train_indices(n, 7, 3, B), images.train_indices(n, 7, 3, B))
    assert not np.array_equal(images.train_indices(n, 8, 3, B), images.train_indices(n, 7, 3, B))


def test_process_rows_partition_the_global_batch_augmentation_included(digits):
    full = images.train_batch(digits, 1, 5, 8, slice(0, 8), augment_padding=2)
    halves = [images.train_batch(digits, 1, 5, 8, slice(i, i + 4), augment_padding=2) for i in (0, 4)]
    for k in ("x", "y"):
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])
    assert full["x"].shape == (8, 6, 5, 3) and full["x"].dtype == np.float32
    plain = images.train_batch(digits, 1, 5, 8, slice(0, 8))
    assert not np.array_equal(plain["x"], full["x"])  # augmentation changed the images ...
    np.testing.assert_array_equal(plain["y"], full["y"])  # ... not the labels


def test_augmentation_is_a_crop_of_the_padded_image_or_its_mirror():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1) + 1
    out = images.augment(x, seed=0, step=0, batch_size=2, rows=slice(0, 2), padding=1)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(2):
        crops = [padded[i, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(np.array_equal(out[i], c) or np.array_equal(out[i], c[:, ::-1]) for c in crops)
    again = images.augment(x, seed=0, step=0, batch_size=2, rows=slice(0, 2), padding=1)
    np.testing.assert_array_equal(out, again)


def test_validation_covers_the_split_once_with_the_padding_masked(digits):
    B = 8
    count = images.eval_batch_count(digits, B, max_batches=100)
    batches = [images.eval_batch(digits, i, B, slice(0, B)) for i in range(count)]
    assert count == 2 and [n for _, n in batches] == [8, 5]
    assert batches[1][0]["mask"].tolist() == [1] * 5 + [0] * 3
    np.testing.assert_array_equal(np.concatenate([b["y"][b["mask"] > 0] for b, _ in batches]), digits.y_val)
    assert images.eval_batch_count(digits, B, max_batches=1) == 1


def test_npz_with_x_y_only_splits_off_the_last_fraction_and_adds_a_channel(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 255, (40, 7, 7), np.uint8), y=np.arange(40) % 4)
    data = images.load(images_cfg(path, val_fraction=0.25))
    assert data.image_shape == (7, 7, 1) and len(data.x_train) == 30 and len(data.x_val) == 10
    assert data.num_classes == 4
    x = images.normalise(data.x_train, data.mean_C, data.std_C)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_sorted_file_warns_that_validation_misses_classes(tmp_path, capsys):
    path = tmp_path / "sorted.npz"
    np.savez(path, x=np.zeros((100, 4, 4), np.uint8), y=np.repeat(np.arange(10), 10))
    images.load(images_cfg(path))
    assert "validation split holds only 1 of 10 classes" in capsys.readouterr().err


def test_mismatched_counts_are_a_user_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((5, 4, 4)), y_train=np.zeros(4, int), x_test=np.zeros((2, 4, 4)), y_test=np.zeros(2, int))
    with pytest.raises(UserError, match="disagree in count"):
        images.load(images_cfg(path))


def test_series_batches_are_pure_and_targets_are_the_next_values():
    a = series.train_batch(seed=0, step=4, batch_size=6, length=10, noise=0.0, rows=slice(0, 6))
    b = series.train_batch(seed=0, step=4, batch_size=6, length=10, noise=0.0, rows=slice(2, 6))
    assert a["x"].shape == (6, 10, 1)
    np.testing.assert_array_equal(a["x"][2:], b["x"])
    np.testing.assert_array_equal(a["x"][:, 1:], a["y"][:, :-1])
    other = series.train_batch(seed=0, step=5, batch_size=6, length=10, noise=0.0, rows=slice(0, 6))
    assert not np.array_equal(a["x"], other["x"])
