"""Generated sequence-regression data: noisy sines, each window a pure function of (seed, step).

Every window has its own frequency, phase and amplitude, so the model must infer them from the
values it has seen; the targets carry independent noise, so the best possible MSE is noise**2.
"""
from dataclasses import dataclass

import numpy as np

from errors import UserError

PROVIDES = ("values",)
INPUT = "sequences"
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class Config:
    kind: str = "series"
    seq_len: int = 64  # values per window; the target is the window shifted by one
    noise: float = 0.05
    eval_seed: int = 1234


@dataclass
class Sines:
    """The generated source: every batch from (seed, step), validation from (eval_seed, i)."""
    seq_len: int
    noise: float
    eval_seed: int
    dims = {"in_features": 1, "out_features": 1}
    meta = {}
    unit = "values"

    @property
    def summary(self) -> str:
        return f"generated noisy sines, windows of {self.seq_len}, noise {self.noise}"

    @property
    def units_per_example(self) -> int:
        return self.seq_len

    def train_batch(self, seed: int, step: int, batch_size: int, rows: slice) -> dict:
        return train_batch(seed, step, batch_size, self.seq_len, self.noise, rows)

    def eval_batch(self, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
        return eval_batch(self.eval_seed, i, batch_size, self.seq_len, self.noise, rows), batch_size

    def eval_count(self, batch_size: int, max_batches: int) -> int:
        return max_batches  # an endless generator: eval_batches decides


def load(cfg, inherited: dict | None = None) -> Sines:
    if cfg.noise < 0 or cfg.seq_len <= 0:
        raise UserError(f"data.noise={cfg.noise} must be >= 0 and data.seq_len={cfg.seq_len} positive")
    return Sines(cfg.seq_len, cfg.noise, cfg.eval_seed)


def windows(seed: int, stream: int, step: int, batch_size: int, length: int, noise: float) -> np.ndarray:
    """The global batch's B series of length + 1 values (float32)."""
    rng = np.random.default_rng([seed, stream, step])
    freq_B1 = rng.uniform(0.01, 0.1, size=(batch_size, 1))  # cycles per time step
    phase_B1 = rng.uniform(0.0, 2 * np.pi, size=(batch_size, 1))
    amp_B1 = rng.uniform(0.5, 1.5, size=(batch_size, 1))
    t_L = np.arange(length + 1)
    clean_BL = amp_B1 * np.sin(2 * np.pi * freq_B1 * t_L + phase_B1)
    return (clean_BL + noise * rng.standard_normal(clean_BL.shape)).astype(np.float32)


def _rows(series_BL: np.ndarray, rows: slice) -> dict:
    s = series_BL[rows, :, None]
    return {"x": s[:, :-1], "y": s[:, 1:]}  # x_BL1 -> next values y_BL1


def train_batch(seed: int, step: int, batch_size: int, length: int, noise: float, rows: slice) -> dict:
    return _rows(windows(seed, _TRAIN_STREAM, step, batch_size, length, noise), rows)


def eval_batch(eval_seed: int, i: int, batch_size: int, length: int, noise: float, rows: slice) -> dict:
    """Validation batch i: the same windows in every run with the same eval_seed."""
    return _rows(windows(eval_seed, _EVAL_STREAM, i, batch_size, length, noise), rows)
