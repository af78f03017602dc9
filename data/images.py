"""Image classification data: whole splits held as arrays; batches are pure functions of (seed, step).

The global batch at `step` takes examples step*B .. step*B+B-1 of an endless stream in which
epoch e is a permutation of the training split keyed on (seed, e); augmentation (random crop with
padding, horizontal flip) is keyed on (seed, step). Each process gathers and augments only its
own rows, so resume and a change of device or host count need nothing saved but the step.

Images are kept in their stored dtype (uint8 for TFDS) and normalised per batch with the
training split's per-channel mean and std, which the checkpoint's meta carries for reload scripts.
"""
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data import download, examples
from data.examples import train_indices
from errors import UserError

PROVIDES = ("classes",)
INPUT = "images"
_AUGMENT_STREAM = 3
_HINT = "pass data.path=FILE.npz (arrays x_train, y_train, x_test, y_test, or x, y) to use local images"


@dataclass
class Config:
    kind: str = "images"
    path: Optional[str] = None  # FILE.npz with x_train/y_train/x_test/y_test, or x/y; None: TFDS `tfds_name`
    tfds_name: str = "cifar10"  # or mnist, fashion_mnist (anything with image/label features)
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    val_fraction: float = 0.1  # for an .npz holding only x, y: the last fraction is validation
    augment: bool = False  # random crop (padding 4) and horizontal flip, keyed on (seed, step)
    crop_padding: int = 4


@dataclass
class Images:
    x_train: np.ndarray  # N x H x W x C
    y_train: np.ndarray  # N int32
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    mean_C: np.ndarray  # per-channel statistics of the training split (float32)
    std_C: np.ndarray
    augment_padding: int = 0  # 0: no augmentation
    unit, units_per_example = "images", 1

    @property
    def image_shape(self) -> tuple:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def dims(self) -> dict:
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape)}

    @property
    def meta(self) -> dict:
        return {**self.dims, "mean": self.mean_C.tolist(), "std": self.std_C.tolist()}

    @property
    def summary(self) -> str:
        return (f"{len(self.x_train):,} training / {len(self.x_val):,} validation images of "
                f"{'x'.join(map(str, self.image_shape))}, {self.num_classes} classes")

    def train_batch(self, seed: int, step: int, batch_size: int, rows: slice) -> dict:
        return train_batch(self, seed, step, batch_size, rows, self.augment_padding)

    def eval_batch(self, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
        return eval_batch(self, i, batch_size, rows)

    def eval_count(self, batch_size: int, max_batches: int) -> int:
        return eval_batch_count(self, batch_size, max_batches)


def _as_nhwc(x: np.ndarray, name: str, path: str) -> np.ndarray:
    if x.ndim == 3:  # N x H x W greyscale
        x = x[..., None]
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.number):
        raise UserError(f"{path}: {name} has shape {x.shape} ({x.dtype}); images must be numeric N x H x W x C "
                        f"or N x H x W")
    return x


def _labels(y: np.ndarray, name: str, path: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UserError(f"{path}: {name} must be a vector of non-negative integer class labels "
                        f"(got shape {y.shape}, {y.dtype})")
    return y.astype(np.int32)


def _from_npz(path: str, val_fraction: float) -> tuple:
    path = os.path.abspath(os.path.expanduser(path))
    arrays = examples.read_npz(path, "data.path", _HINT)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    else:
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be in (0, 1)")
        cut = int(len(arrays["x"]) * (1.0 - val_fraction))
        parts = [arrays["x"][:cut], arrays["y"][:cut], arrays["x"][cut:], arrays["y"][cut:]]
    x_tr, x_va = _as_nhwc(parts[0], "x_train", path), _as_nhwc(parts[2], "x_test", path)
    y_tr, y_va = _labels(parts[1], "y_train", path), _labels(parts[3], "y_test", path)
    if len(x_tr) != len(y_tr) or len(x_va) != len(y_va) or x_tr.shape[1:] != x_va.shape[1:]:
        raise UserError(f"{path}: images and labels disagree in count, or train and test images in shape "
                        f"({x_tr.shape}, {y_tr.shape}, {x_va.shape}, {y_va.shape})")
    if not len(x_tr) or not len(x_va):
        raise UserError(f"{path}: the training and validation splits must both hold images")
    return x_tr, y_tr, x_va, y_va, int(max(y_tr.max(), y_va.max())) + 1


def _from_tfds(cfg) -> tuple:
    builder = download.prepare(cfg, hint=_HINT)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UserError(f"TFDS dataset {cfg.tfds_name!r} has no image/label features; {_HINT}")
    out = []
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        examples = [source[i] for i in range(len(source))]
        out += [np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples], np.int32)]
    return (*out, int(features["label"].num_classes))


def load(cfg, inherited: dict | None = None) -> Images:
    """The train and validation splits named by the data config, with normalisation statistics."""
    x_tr, y_tr, x_va, y_va, num_classes = _from_npz(cfg.path, cfg.val_fraction) if cfg.path else _from_tfds(cfg)
    if len(np.unique(y_va)) < min(num_classes, len(y_va)) // 2:
        print(f"warning: the validation split holds only {len(np.unique(y_va))} of {num_classes} classes; "
              f"is the file sorted by class? shuffle it before saving", file=sys.stderr)
    sample = x_tr[:: max(1, len(x_tr) // 10_000)].astype(np.float64)  # statistics of <= 10k images suffice
    mean_C, std_C = sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))
    std_C = np.where(std_C > 0, std_C, 1.0)
    return Images(x_tr, y_tr, x_va, y_va, num_classes, mean_C.astype(np.float32), std_C.astype(np.float32),
                  cfg.crop_padding if cfg.augment else 0)


def normalise(x_BHWC: np.ndarray, mean_C, std_C) -> np.ndarray:
    return ((x_BHWC.astype(np.float32) - np.asarray(mean_C, np.float32)) / np.asarray(std_C, np.float32))


def augment(x_BHWC: np.ndarray, seed: int, step: int, batch_size: int, rows: slice, padding: int) -> np.ndarray:
    """Random crop (zero padding) and horizontal flip of this process's rows, keyed on (seed, step)."""
    B, H, W, _ = x_BHWC.shape
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])  # drawn for the global batch, then sliced
    dy_B, dx_B = (rng.integers(0, 2 * padding + 1, size=batch_size)[rows] for _ in range(2))
    flip_B = rng.random(batch_size)[rows] < 0.5
    padded = np.pad(x_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows_BH = dy_B[:, None] + np.arange(H)
    cols_BW = dx_B[:, None] + np.arange(W)
    cols_BW = np.where(flip_B[:, None], cols_BW[:, ::-1], cols_BW)
    return padded[np.arange(B)[:, None, None], rows_BH[:, :, None], cols_BW[:, None, :]]


def train_batch(images: Images, seed: int, step: int, batch_size: int, rows: slice, augment_padding: int = 0) -> dict:
    """This process's `rows` of the global training batch at `step`: {"x": B x H x W x C float32, "y"}."""
    idx = train_indices(len(images.x_train), seed, step, batch_size)[rows]
    x = normalise(images.x_train[idx], images.mean_C, images.std_C)
    if augment_padding:
        x = augment(x, seed, step, batch_size, rows, augment_padding)
    return {"x": x, "y": images.y_train[idx]}


def eval_batch(images: Images, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
    """Validation batch i in order (the last is padded, with mask 0), and its count of real examples."""
    batch, n_real = examples.eval_batch(images, i, batch_size, rows)
    return {**batch, "x": normalise(batch["x"], images.mean_C, images.std_C)}, n_real


def eval_batch_count(images: Images, batch_size: int, max_batches: int) -> int:
    """Batches that cover the validation split, capped at eval_batches."""
    return examples.eval_count(len(images.x_val), batch_size, max_batches)
