"""Int8 weights with per-output-channel float scales: the dense layers (and token embeddings) of a compressed run.

Shape key: T rows (batch x length), D input features, F output features, V vocab, R int8 rows fed to the dot.

`model.quant=int8` (weight-only) or `int8_dynamic` makes a family build `Linear` in place of `nnx.Linear`
(and, with `model.quant_embeddings`, `Embed` in place of `nnx.Embed`); `compress.py` fills their params
from a trained float run with `quantize_params`. Nothing here trains: the params are int8, with no gradients.

Weight w_DF is stored as q_DF = round(w / s_F) in [-127, 127] with s_F = max_D |w| / 127 (symmetric, one
scale per output channel), so |w - q * s| <= s / 2. A token embedding keeps one scale per row (token): the
same numbers serve the lookup and, as per-output-channel scales, the tied head.

Why every product is an int8 x int8 -> int32 dot: XLA-CPU has no kernel that reads int8 weights into a
float dot. It converts them to float32 first, and in a decode loop it hoists that convert out of the loop
(the weights are loop-invariant), so a float x dequant(int8) layer streams float32 weights, exactly as
the float model does. Its YNNPACK int8 GEMM (VNNI) reads the int8 weights themselves, but only with two or
more rows: a one-row dot becomes a matrix-vector product that XLA runs in int32 (benchmarks/README.md,
"Compression"). So activations are quantized per row (per token) too:
- int8 (weight-only quality): each row as 16-bit fixed point, x = s_T (256 hi + lo), hi and lo int8; the
  two halves are two rows of one int8 dot. The activation error, <= max|x| / 65024 per element, is far
  below the weights'; a one-row decode step is a two-row dot.
- int8_dynamic: each row as int8 (LLM.int8()'s vector-wise scheme without outliers): half the rows of
  int8, coarser activations; a one-row step is padded to two rows.

Why not Google's qwix (0.1.8, tried first): its PTQ replaces a weight on the module whose op it
intercepts, and our layer-stacked blocks run as per-layer `nnx.merge` copies (transformer.run_blocks), so
the stacked kernels stayed float32 and were re-quantized on every call; with bf16 matmuls (model/matmul.py's
custom VJP) it failed with flax's TraceContextError.
"""
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError

METHODS = ("int8", "int8_dynamic")
Q_MAX = 127  # symmetric int8: -128 is never used, so -q is always representable
HI = 256  # int8 (weight-only): x / s = HI * hi + lo
X_MAX = Q_MAX * HI  # |x / s| <= 32512 keeps hi in [-127, 127] and lo in [-128, 127]


def check(cfg) -> None:
    """A family's model.quant and model.quant_embeddings (if it has the latter)."""
    if cfg.quant not in ("none", *METHODS):
        raise UserError(f"model.quant={cfg.quant} must be none, {' or '.join(METHODS)}")
    if cfg.get("quant_embeddings") and cfg.quant == "none":
        raise UserError("model.quant_embeddings=true needs model.quant=int8 or int8_dynamic")


def linear(cfg):
    """nnx.Linear, or this file's `Linear` when the model config (a compressed run's) says model.quant."""
    q = cfg.get("quant", "none")  # checkpoints from before the key: float
    return nnx.Linear if q == "none" else partial(Linear, dynamic=q == "int8_dynamic")


def embed(cfg):
    """nnx.Embed, or this file's `Embed` when the model config says model.quant_embeddings."""
    return partial(Embed, dynamic=cfg.quant == "int8_dynamic") if cfg.get("quant_embeddings") else nnx.Embed


def quantize(w, axis: int):
    """(q int8, scale float32): w per channel, `axis` being the one reduced (absent from scale)."""
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / Q_MAX, 1.0)  # an all-zero channel stays zero with any scale
    q = jnp.clip(jnp.round(w / scale), -Q_MAX, Q_MAX).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis)


def dequantize(q, scale, axis: int):
    """The float32 weights that (q, scale) stand for."""
    return q.astype(jnp.float32) * jnp.expand_dims(scale, axis)


def _int8_rows(x_TD, dynamic: bool):
    """(x_RD int8, s_T1, combine): x_TD's rows as int8 rows of one dot, and how to rebuild x_TD @ w from it."""
    T = x_TD.shape[0]
    x_TD = x_TD.astype(jnp.float32)
    amax_T1 = jnp.max(jnp.abs(x_TD), axis=-1, keepdims=True)
    if dynamic:
        s_T1 = jnp.where(amax_T1 > 0, amax_T1 / Q_MAX, 1.0)
        x_RD = jnp.round(x_TD / s_T1).astype(jnp.int8)
        if T == 1:  # two rows: see the module docstring
            x_RD = jnp.concatenate([x_RD, jnp.zeros_like(x_RD)])
        return x_RD, s_T1, lambda acc_RF: acc_RF[:T]
    s_T1 = jnp.where(amax_T1 > 0, amax_T1 / X_MAX, 1.0)
    x_TD = jnp.round(x_TD / s_T1)
    hi_TD = jnp.floor((x_TD + HI // 2) / HI)
    lo_TD = x_TD - HI * hi_TD
    x_RD = jnp.concatenate([hi_TD, lo_TD]).astype(jnp.int8)
    return x_RD, s_T1, lambda acc_RF: acc_RF[:T] * HI + acc_RF[T:]


def matmul(x_TD, q, scale_F, *, dynamic: bool, transposed: bool = False):
    """x_TD @ dequantize(q) as float32 (T, F): q is q_DF, or q_FD (an embedding) if `transposed`."""
    x_RD, s_T1, combine = _int8_rows(x_TD, dynamic)
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    acc_RF = jax.lax.dot_general(x_RD, q, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    return combine(acc_RF) * s_T1 * scale_F


class Linear(nnx.Module):
    """`nnx.Linear`'s int8 stand-in: kernel int8 (D, F), scale float32 (F,), optional float bias."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
                 dynamic: bool = False, rngs: nnx.Rngs, kernel_init=None, **_):
        # kernel_init (and nnx.Linear's other options) are accepted and unused: quantize_params fills the params.
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), jnp.int8))
        self.scale = nnx.Param(jnp.ones((out_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.dtype, self.dynamic = dtype, dynamic

    def __call__(self, x):
        y_TF = matmul(x.reshape(-1, x.shape[-1]), self.kernel[...], self.scale[...], dynamic=self.dynamic)
        y_TF = y_TF if self.bias is None else y_TF + self.bias[...]
        return y_TF.reshape(*x.shape[:-1], -1).astype(self.dtype or x.dtype)


class Embed(nnx.Module):
    """`nnx.Embed`'s int8 stand-in: embedding int8 (V, D), scale float32 (V,), one per token."""

    def __init__(self, num_embeddings: int, features: int, *, dynamic: bool = False, rngs: nnx.Rngs,
                 embedding_init=None, **_):
        self.embedding = nnx.Param(jnp.zeros((num_embeddings, features), jnp.int8))
        self.scale = nnx.Param(jnp.ones((num_embeddings,), jnp.float32))
        self.dynamic = dynamic

    def __call__(self, ids):
        return self.embedding[...][ids].astype(jnp.float32) * self.scale[...][ids][..., None]

    def attend(self, x_TD):
        """The tied head: x_TD @ embedding.T, logits_TV; the rows' scales are the head's output-channel scales."""
        return matmul(x_TD, self.embedding[...], self.scale[...], dynamic=self.dynamic, transposed=True)


@dataclass(frozen=True)
class Layout:
    """Where an int8 module keeps its weight and which axis of it its scales reduce (counted from the end)."""
    weight: str
    axis: int


LAYOUTS = (Layout("kernel", -2), Layout("embedding", -1))  # Linear: per column F of (D, F); Embed: per row V


def quantize_params(params: dict, target: dict) -> tuple[dict, list[str]]:
    """(`params` of a float model as the quantized model's `target` tree wants them, the paths made int8).

    Both are pure dicts (nnx.to_pure_dict); `target`'s leaves need only shape and dtype. Layer-stacked
    weights (a leading N axis) get their scales per layer and channel, as the axis counts from the end.
    """
    done = []

    def walk(p: dict, t: dict, path: str) -> dict:
        out = {}
        layout = next((lay for lay in LAYOUTS if lay.weight in t and t[lay.weight].dtype == jnp.int8), None)
        for k, tk in t.items():
            if layout is not None and k in (layout.weight, "scale"):
                continue
            out[k] = walk(p[k], tk, f"{path}{k}/") if isinstance(tk, dict) else p[k]
        if layout is not None:
            out[layout.weight], out["scale"] = quantize(p[layout.weight], layout.axis)
            done.append(path + layout.weight)
        return out

    return walk(params, target, ""), done
