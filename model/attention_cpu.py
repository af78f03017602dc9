"""Attention in the layouts XLA-CPU runs fastest: the same math as model/transformer.py's `attend`.

`model.attention=auto` uses it on the CPU backend (`reference` or `cpu` to choose); tests check that
both give the same outputs, gradients and decoded tokens. What differs is layout only:
- heads lead (B*H or B, H before L), so every attention dot is a plain batched matmul;
- the KV cache is (B*H, M, K) per layer: the dots read the updated buffer as it is, where a 4-D cache
  made XLA-CPU update a reshaped copy beside the carried one, every token;
- long causal training windows run in query blocks of Q_ROWS rows, each against only the keys it
  can see, so the fully masked upper blocks are never computed.
benchmarks/README.md has the measurements behind each.

Shape key: B batch, L queries, M keys, H heads, K head dim, X = B*H.
"""
import math

import jax
import jax.numpy as jnp

Q_ROWS = 64  # causal training attention runs in query blocks of this many rows once L >= 2 * Q_ROWS


def _attend(q__LK, k__MK, v__MK, allowed__LM, drop, key):
    """Softmax attention with any leading dims; `allowed__LM` broadcasts against the scores."""
    scores__LM = jnp.einsum("...LK,...MK->...LM", q__LK, k__MK) / math.sqrt(q__LK.shape[-1])
    scores__LM = jnp.where(allowed__LM, scores__LM.astype(jnp.float32), -jnp.inf)
    probs__LM = jax.nn.softmax(scores__LM, axis=-1).astype(q__LK.dtype)
    probs__LM = probs__LM if drop is None else drop(probs__LM, rngs=key)
    return jnp.einsum("...LM,...MK->...LK", probs__LM, v__MK.astype(q__LK.dtype))


def init_cache(batch: int, length: int, heads: int, head_dim: int, dtype):
    """One layer's zeroed (k_XMK, v_XMK)."""
    return (jnp.zeros((batch * heads, length, head_dim), dtype),) * 2


def attention(q_BLHK, k_BLHK, v_BLHK, *, causal: bool, mask_BM=None, cache=None, pos=0, drop=None, key=None):
    """(y_BLHK, cache): attention of the new queries over the cache (written at `pos` first) or the window."""
    B, L, H, K = q_BLHK.shape
    q_BHLK, k_BHLK, v_BHLK = (t.transpose(0, 2, 1, 3) for t in (q_BLHK, k_BLHK, v_BLHK))
    if cache is not None:
        new = (t.reshape(B * H, L, K).astype(c.dtype) for t, c in zip((k_BHLK, v_BHLK), cache))
        cache = tuple(jax.lax.dynamic_update_slice(c, n, (0, pos, 0)) for c, n in zip(cache, new))
        M = cache[0].shape[1]
        allowed_1LM = _allowed(L, M, pos, causal)
        if mask_BM is not None:
            allowed_1LM = (allowed_1LM & mask_BM[:, None, :].astype(bool)).repeat(H, axis=0)
        y_XLK = _attend(q_BHLK.reshape(B * H, L, K), *cache, allowed_1LM, drop, key)
        return y_XLK.reshape(B, H, L, K).transpose(0, 2, 1, 3), cache
    mask_B11M = None if mask_BM is None else mask_BM[:, None, None, :].astype(bool)
    if causal and mask_BM is None and L // Q_ROWS > 1 and L % Q_ROWS == 0:
        n = L // Q_ROWS
        keys = [None] * n if key is None else list(jax.random.split(key, n))
        y_BHLK = jnp.concatenate([
            _attend(q_BHLK[:, :, i * Q_ROWS:(i + 1) * Q_ROWS], k_BHLK[:, :, :(i + 1) * Q_ROWS],
                    v_BHLK[:, :, :(i + 1) * Q_ROWS], _allowed(Q_ROWS, (i + 1) * Q_ROWS, i * Q_ROWS, True), drop,
                    keys[i]) for i in range(n)], axis=2)
    else:
        allowed = _allowed(L, L, 0, causal) if mask_B11M is None else _allowed(L, L, 0, causal) & mask_B11M
        y_BHLK = _attend(q_BHLK, k_BHLK, v_BHLK, allowed, drop, key)
    return y_BHLK.transpose(0, 2, 1, 3), None


def _allowed(L: int, M: int, pos, causal: bool):
    """(1, L, M): which keys each query at pos..pos+L-1 may see."""
    if not causal:
        return jnp.ones((1, L, M), bool)
    return (jnp.arange(M)[None, :] <= pos + jnp.arange(L)[:, None])[None]
