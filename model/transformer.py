"""Decoder-only transformer LM (GPT-2 layout, pre-LN, tied head) in Flax NNX.

Shape key: B batch, L length, T = B*L tokens, M attended (cache) length, D model width, H heads, K head dim,
F MLP width, V vocab, N layers.

The N blocks are stored stacked (one Block whose params have a leading N axis), so the same
checkpoint serves `scan_layers=True` (one compiled block inside a lax.scan) and `False`
(a Python loop over the N slices, unrolled by XLA): the switch can change between resumes.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from model.matmul import DOT_GENERAL

Q_ROWS = 64  # training attention runs in causal query blocks of this many rows (see Block.__call__)


class Block(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.n_heads = cfg.n_heads
        self.dtype = jnp.dtype(cfg.dtype)
        std = nnx.initializers.normal(0.02)
        # nanoGPT's scaled init of the projections into the residual stream (GPT-2 paper).
        std_resid = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers))
        dot_general = DOT_GENERAL[cfg.get("matmul_dtype", "float32")]  # checkpoints from before the key: float32
        dense = partial(nnx.Linear, use_bias=cfg.bias, dtype=self.dtype, dot_general=dot_general, rngs=rngs)
        norm = partial(nnx.LayerNorm, D, use_bias=cfg.bias, epsilon=1e-5, dtype=self.dtype, rngs=rngs)
        self.ln1, self.ln2 = norm(), norm()
        self.qkv = dense(D, 3 * D, kernel_init=std)
        self.attn_proj = dense(D, D, kernel_init=std_resid)
        self.fc = dense(D, F, kernel_init=std)
        self.fc_proj = dense(F, D, kernel_init=std_resid)
        self.drop = nnx.Dropout(cfg.dropout)

    def _dropout(self, x, key):
        return x if key is None else self.drop(x, rngs=key)

    def _attend(self, q__LK, k__MK, v__MK, offset, key):
        """Causal softmax attention of queries at positions offset..offset+L-1 over keys 0..M-1.

        `__` is any leading batch dims, (B, H) or (B*H,).
        """
        L, M, K = q__LK.shape[-2], k__MK.shape[-2], q__LK.shape[-1]
        scores__LM = jnp.einsum("...LK,...MK->...LM", q__LK, k__MK) / math.sqrt(K)
        causal_LM = jnp.arange(M)[None, :] <= (jnp.arange(L)[:, None] + offset)
        scores__LM = jnp.where(causal_LM, scores__LM.astype(jnp.float32), -jnp.inf)
        probs__LM = self._dropout(jax.nn.softmax(scores__LM, axis=-1).astype(self.dtype), key)
        return jnp.einsum("...LM,...MK->...LK", probs__LM, v__MK.astype(self.dtype))

    def __call__(self, x_BLD, cache, layer, pos, key):
        """Returns (x_BLD, cache). cache is None (training), this layer's (k_XMK, v_XMK) (layer=None),
        or every layer's stacked (k_NXMK, v_NXMK) under scan-over-layers; X = B*H.

        New keys/values are written at position `pos` (and [layer] when stacked) with
        dynamic_update_slice, so the cache is updated in place, never copied per token.
        """
        k_attn, k_res1, k_res2 = (None,) * 3 if key is None else jax.random.split(key, 3)
        B, L, D = x_BLD.shape
        H = self.n_heads
        # Dense layers see (B*L, D): XLA-CPU runs 2-D matmuls and their gradients ~2x faster than 3-D ones.
        qkv_BLD3 = self.qkv(self.ln1(x_BLD).reshape(B * L, D)).reshape(B, L, 3 * D)
        q_BLHK, k_BLHK, v_BLHK = (t.reshape(B, L, H, D // H) for t in jnp.split(qkv_BLD3, 3, axis=-1))
        q_BHLK, k_BHLK, v_BHLK = (t.transpose(0, 2, 1, 3) for t in (q_BLHK, k_BLHK, v_BLHK))
        if cache is not None:
            # The cache holds (B*H, M, K): the attention dots read the updated buffer as it is (a 4-D
            # cache made XLA-CPU update a reshaped copy for them beside the carried one, every token).
            k_XLK, v_XLK = (t.reshape(B * H, L, D // H).astype(c.dtype) for t, c in zip((k_BHLK, v_BHLK), cache))
            if layer is None:  # this layer's own (k_XMK, v_XMK)
                cache = tuple(jax.lax.dynamic_update_slice(c, new, (0, pos, 0)) for c, new in zip(cache, (k_XLK, v_XLK)))
                k_XMK, v_XMK = cache
            else:  # every layer's (k_NXMK, v_NXMK), this one at [layer]
                cache = tuple(jax.lax.dynamic_update_slice(c, new[None], (layer, 0, pos, 0))
                              for c, new in zip(cache, (k_XLK, v_XLK)))
                k_XMK, v_XMK = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache)
            y_XLK = self._attend(q_BHLK.reshape(B * H, L, D // H), k_XMK, v_XMK, pos, k_attn)
            y_BHLK = y_XLK.reshape(B, H, L, D // H)
        elif L // Q_ROWS > 1 and L % Q_ROWS == 0:
            # Query block i attends only keys [0, (i+1)*Q_ROWS): the fully masked upper-right blocks are
            # never computed ((n+1)/2n of the work: 62.5% at block_size 256). On the 2-core CPU the GPU
            # config's step drops ~6% (9.0 -> 8.5 s) and block_size 128 ~9%; at 64 it would not pay.
            n_blocks = L // Q_ROWS
            keys = [None] * n_blocks if k_attn is None else list(jax.random.split(k_attn, n_blocks))
            y_BHLK = jnp.concatenate([
                self._attend(q_BHLK[:, :, i * Q_ROWS:(i + 1) * Q_ROWS], k_BHLK[:, :, :(i + 1) * Q_ROWS],
                             v_BHLK[:, :, :(i + 1) * Q_ROWS], i * Q_ROWS, keys[i]) for i in range(n_blocks)], axis=2)
        else:
            y_BHLK = self._attend(q_BHLK, k_BHLK, v_BHLK, 0, k_attn)
        y_BLD = y_BHLK.transpose(0, 2, 1, 3).reshape(B, L, D)
        x_TD = x_BLD.reshape(B * L, D) + self._dropout(self.attn_proj(y_BLD.reshape(B * L, D)), k_res1)
        h_TF = jax.nn.gelu(self.fc(self.ln2(x_TD)), approximate=True)
        x_TD = x_TD + self._dropout(self.fc_proj(h_TF), k_res2)
        return x_TD.reshape(B, L, D), cache


class Transformer(nnx.Module):
    """Token + learned position embeddings, N pre-LN blocks, final LN, head tied to the embedding."""

    TASKS = ("lm",)  # the tasks (core/task.py) this family can train on

    def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
        # Plain hashable fields only: they become part of the static graph definition.
        self.n_layers, self.n_heads, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        self.block_size, self.dtype = cfg.block_size, jnp.dtype(cfg.dtype)
        self.scan_layers, self.remat = cfg.scan_layers, cfg.remat
        std = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(vocab_size, cfg.d_model, embedding_init=std, rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.d_model, embedding_init=std, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = nnx.LayerNorm(cfg.d_model, use_bias=cfg.bias, epsilon=1e-5, rngs=rngs)

    def init_cache(self, batch: int, length: int | None = None):
        """Zeroed KV cache: one (k_XMK, v_XMK) per layer, X = B*H, or (k_NXMK, v_NXMK) under scan-over-layers.

        Separate per-layer buffers are updated in place without slicing a stacked array (~17% faster
        decode at batch 16 on CPU); the layer scan needs the stacked form.
        """
        shape = (batch * self.n_heads, length or self.block_size, self.d_model // self.n_heads)
        if not self.scan_layers:
            return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.n_layers))
        shape = (self.n_layers, *shape)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def decoder(self):
        """This model's call with every layer's weights sliced out of the stacked params once, here.

        Called outside a decode loop (core/sampler.py): inside one, XLA-CPU copies each layer's weights
        out of the stack on every iteration (~3 MB per step for the CPU config).
        """
        if self.scan_layers:
            return self
        block_state = nnx.state(self.blocks)
        return partial(self, layer_states=[jax.tree.map(lambda a: a[i], block_state) for i in range(self.n_layers)])

    def __call__(self, idx_BL, *, key=None, cache=None, pos=0, layer_states=None):
        """Logits_BLV for tokens at positions pos..pos+L-1; with a cache, returns (logits, cache).

        key: a PRNG key enables dropout (training); None is deterministic.
        layer_states: every layer's weights already sliced out of the stack (see `decoder`).
        """
        L = idx_BL.shape[1]
        k_emb, k_blocks = (None, None) if key is None else jax.random.split(key)
        pos_L = pos + jnp.arange(L)
        x_BLD = (self.wte(idx_BL) + self.wpe(pos_L)[None]).astype(self.dtype)
        x_BLD = x_BLD if k_emb is None else self.drop(x_BLD, rngs=k_emb)

        graphdef, block_state = nnx.split(self.blocks)
        keys_N = None if k_blocks is None else jax.random.split(k_blocks, self.n_layers)

        def apply(x, cache, layer_state, layer, layer_key):
            return nnx.merge(graphdef, layer_state)(x, cache, layer, pos, layer_key)

        if self.remat:
            apply = jax.checkpoint(apply)
        if self.scan_layers:
            def body(carry, xs):
                return apply(*carry, *xs), None

            layers = (block_state, jnp.arange(self.n_layers), keys_N)
            (x_BLD, new_cache), _ = jax.lax.scan(body, (x_BLD, cache), layers)
        else:
            new_cache = [] if cache is not None else None
            for i in range(self.n_layers):
                layer_state = layer_states[i] if layer_states else jax.tree.map(lambda a: a[i], block_state)
                layer_key = None if keys_N is None else keys_N[i]
                x_BLD, layer_cache = apply(x_BLD, None if cache is None else cache[i], layer_state, None, layer_key)
                if cache is not None:
                    new_cache.append(layer_cache)
            new_cache = None if cache is None else tuple(new_cache)

        B, _, D = x_BLD.shape
        logits_TV = self.wte.attend(self.ln_f(x_BLD.astype(jnp.float32).reshape(B * L, D)))  # 2-D, as in Block
        logits_BLV = logits_TV.reshape(B, L, -1)
        return logits_BLV if cache is None else (logits_BLV, new_cache)
