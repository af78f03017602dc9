"""Transformer LM in Flax NNX: GPT-2 layout (pre-LN, learned or rotary positions, head tied to the embedding).

Shape key: B batch, L length, M attended length, D model width, H heads, K head dim, F MLP width,
V vocab, N layers.

`Attention`, `MLP` and `Block` take `causal` and a key padding mask, so the encoder (model/encoder.py)
is built from the same blocks. The N blocks are stored stacked (one Block whose params have a leading
N axis), so one checkpoint serves `scan_layers=True` (one compiled block inside a lax.scan) and
`False` (a Python loop over the N slices): the switch may change between resumes.
"""
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from model import attention_cpu, quant
from model.matmul import DOT_GENERAL

TASKS = ("lm",)
INPUTS = ("text",)
ACTIVATIONS = {"gelu_tanh": partial(jax.nn.gelu, approximate=True), "gelu": partial(jax.nn.gelu, approximate=False)}


@dataclass
class Config:
    family: str = "transformer"
    # The defaults train in minutes on a laptop CPU; +experiment=shakespeare_char is nanoGPT's GPU size.
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    block_size: int = 256  # positions the model has; training windows are data.seq_len <= block_size
    dropout: float = 0.0
    bias: bool = False
    # gelu_tanh: GPT-2's `gelu_new` (tanh approximation); gelu: exact (nanoGPT's nn.GELU), for imported runs.
    activation: str = "gelu_tanh"
    dtype: str = "float32"  # compute dtype; params stay float32
    # bfloat16: dense matmuls (forward and both gradients) on bf16 operands, float32 accumulation
    # (model/matmul.py); everything else stays float32. float32: exact. auto: bfloat16 on accelerators
    # and CPUs with AVX512-BF16/AMX, float32 on other CPUs (where bf16 is the slower), chosen when traced.
    matmul_dtype: str = "float32"
    scan_layers: bool = False  # one compiled block in a lax.scan: faster compiles for deep models
    remat: bool = False
    # auto: model/attention_cpu.py's layouts on the CPU backend, this file's `attend` elsewhere; or
    # reference | cpu. The same math and params either way.
    attention: str = "auto"
    # learned: GPT-2's position embedding table (block_size rows); rope: rotary positions on the queries
    # and keys (Su et al. 2021), no table, so attention sees only offsets between tokens.
    pos_emb: str = "learned"
    # Set by compress.py in the runs it writes, never for training: int8 dense layers (model/quant.py),
    # weight-only (int8) or with int8 activations (int8_dynamic); quant_embeddings: the token embedding too.
    quant: str = "none"
    quant_embeddings: bool = False


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    if cfg.activation not in ACTIVATIONS:
        raise UserError(f"model.activation={cfg.activation} must be gelu_tanh or gelu")
    check_pos_emb(cfg)
    if cfg.attention not in ("auto", "reference", "cpu"):
        raise UserError(f"model.attention={cfg.attention} must be auto, reference or cpu")
    quant.check(cfg)
    if cfg.matmul_dtype not in DOT_GENERAL:
        raise UserError(f"model.matmul_dtype={cfg.matmul_dtype} must be float32, bfloat16 or auto")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    if cfg.block_size <= 0 or cfg.n_layers <= 0:
        raise UserError("model.block_size and model.n_layers must be positive")


def check_pos_emb(cfg) -> None:
    pos_emb = cfg.get("pos_emb", "learned")
    if pos_emb not in ("learned", "rope"):
        raise UserError(f"model.pos_emb={pos_emb} must be learned or rope")
    if pos_emb == "rope" and cfg.n_heads > 0 and (cfg.d_model // cfg.n_heads) % 2:
        raise UserError(f"model.pos_emb=rope rotates pairs of each head's {cfg.d_model // cfg.n_heads} dims: "
                        f"pick d_model / n_heads even")


def position_table(cfg, rngs):
    """The learned position embedding (block_size x D), or None under rotary positions."""
    if cfg.get("pos_emb", "learned") == "rope":  # checkpoints from before the key: learned
        return None
    return nnx.Embed(cfg.block_size, cfg.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)


def rope(x_BLHK, pos_L, base: float = 10000.0):
    """Rotary positions: each pair (i, i + K/2) of a head's dims turned by pos * base^(-2i/K) (GPT-NeoX's layout)."""
    K = x_BLHK.shape[-1]
    freq_F = base ** (-jnp.arange(0, K // 2, dtype=jnp.float32) * 2 / K)
    angle_LF = pos_L.astype(jnp.float32)[:, None] * freq_F[None]
    cos_L1F, sin_L1F = jnp.cos(angle_LF)[:, None], jnp.sin(angle_LF)[:, None]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos_L1F - x2 * sin_L1F, x2 * cos_L1F + x1 * sin_L1F], -1).astype(x_BLHK.dtype)


def cpu_attention(choice: str) -> bool:
    """Whether attention runs in model/attention_cpu.py's layouts.

    Asked when the model is traced or its cache made, never when it is built: building (e.g. under
    eval_shape, to size a model) must not start JAX's backend before sample.py sizes its threads.
    """
    return choice == "cpu" or (choice == "auto" and jax.default_backend() == "cpu")


def dense_factory(cfg, rngs):
    """nnx.Linear with the config's bias, dtype and matmul precision; int8 in a compressed run (model/quant.py)."""
    return partial(quant.linear(cfg), use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                   dot_general=DOT_GENERAL[cfg.get("matmul_dtype", "float32")])  # old checkpoints: float32


def attend(q_BLHK, k_BMHK, v_BMHK, allowed_BLM, drop=None):
    """Softmax attention of L queries over M keys; `allowed_BLM` masks out (False) what may not be seen."""
    scores_BHLM = jnp.einsum("BLHK,BMHK->BHLM", q_BLHK, k_BMHK) / math.sqrt(q_BLHK.shape[-1])
    scores_BHLM = jnp.where(allowed_BLM[:, None], scores_BHLM.astype(jnp.float32), -jnp.inf)
    probs_BHLM = jax.nn.softmax(scores_BHLM, axis=-1).astype(q_BLHK.dtype)
    probs_BHLM = probs_BHLM if drop is None else drop(probs_BHLM)
    return jnp.einsum("BHLM,BMHK->BLHK", probs_BHLM, v_BMHK.astype(q_BLHK.dtype))


def allowed(L: int, M: int, pos, causal: bool, mask_BM=None):
    """Which of M keys each of L queries (at positions pos..pos+L-1) may attend to: (B or 1, L, M)."""
    allowed_1LM = jnp.ones((1, L, M), bool)
    if causal:
        allowed_1LM = (jnp.arange(M)[None, :] <= pos + jnp.arange(L)[:, None])[None]
    return allowed_1LM if mask_BM is None else allowed_1LM & mask_BM[:, None, :].astype(bool)


class Attention(nnx.Module):
    """Multi-head self-attention; with a cache, new keys and values are written at `pos` first."""

    def __init__(self, cfg, *, causal: bool, rngs: nnx.Rngs):
        D = cfg.d_model
        dense = dense_factory(cfg, rngs)
        self.n_heads, self.causal = cfg.n_heads, causal
        self.attention = cfg.get("attention", "auto")  # checkpoints from before the key: auto
        self.rope = cfg.get("pos_emb", "learned") == "rope"
        self.qkv = dense(D, 3 * D, kernel_init=nnx.initializers.normal(0.02))
        # GPT-2's scaled init of the projections into the residual stream.
        self.proj = dense(D, D, kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers)))
        self.drop = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BLD, *, mask_BM=None, cache=None, pos=0, key=None):
        """(y_BLD, cache); cache is None or (k_BMHK, v_BMHK) holding every position so far."""
        B, L, D = x_BLD.shape
        H = self.n_heads
        q_BLHK, k_BLHK, v_BLHK = (t.reshape(B, L, H, D // H) for t in jnp.split(self.qkv(x_BLD), 3, axis=-1))
        if self.rope:  # before the cache write: cached keys keep their rotation
            pos_L = pos + jnp.arange(L)
            q_BLHK, k_BLHK = rope(q_BLHK, pos_L), rope(k_BLHK, pos_L)
        k_attn, k_out = (None, None) if key is None else jax.random.split(key)
        if cpu_attention(self.attention):  # the same math in XLA-CPU's fastest layouts (a (B*H, M, K) cache)
            y_BLHK, cache = attention_cpu.attention(q_BLHK, k_BLHK, v_BLHK, causal=self.causal, mask_BM=mask_BM,
                                                    cache=cache, pos=pos, drop=None if key is None else self.drop,
                                                    key=k_attn)
        else:
            if cache is not None:  # written in place (dynamic_update_slice), never copied per token
                cache = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, pos, 0, 0))
                              for c, new in zip(cache, (k_BLHK, v_BLHK)))
                k_BLHK, v_BLHK = cache
            drop = None if key is None else partial(self.drop, rngs=k_attn)
            mask = allowed(L, k_BLHK.shape[1], pos, self.causal, mask_BM)
            y_BLHK = attend(q_BLHK, k_BLHK, v_BLHK, mask, drop)
        y_BLD = self.proj(y_BLHK.reshape(B, L, D))
        return (y_BLD if key is None else self.drop(y_BLD, rngs=k_out)), cache


class MLP(nnx.Module):
    """Dense D -> F, GELU, dense F -> D."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        dense = dense_factory(cfg, rngs)
        self.fc = dense(D, F, kernel_init=nnx.initializers.normal(0.02))
        self.proj = dense(F, D, kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers)))
        self.drop = nnx.Dropout(cfg.dropout)
        self.activation = cfg.get("activation", "gelu_tanh")  # configs from before the key (and the encoder's)

    def __call__(self, x_BLD, key=None):
        # On (B*L, D) rows: XLA-CPU fuses the GELU and its gradient with 2-D dots, not 3-D ones.
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        y_BLD = self.proj(ACTIVATIONS[self.activation](self.fc(x_TD))).reshape(x_BLD.shape)
        return y_BLD if key is None else self.drop(y_BLD, rngs=key)


class Block(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg, *, causal: bool = True, rngs: nnx.Rngs):
        norm = partial(nnx.LayerNorm, cfg.d_model, use_bias=cfg.bias, epsilon=1e-5, dtype=jnp.dtype(cfg.dtype),
                       rngs=rngs)
        self.ln1, self.ln2 = norm(), norm()
        self.attn = Attention(cfg, causal=causal, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BLD, *, mask_BM=None, cache=None, pos=0, key=None):
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        y_BLD, cache = self.attn(self.ln1(x_BLD), mask_BM=mask_BM, cache=cache, pos=pos, key=k_attn)
        x_BLD = x_BLD + y_BLD
        return x_BLD + self.mlp(self.ln2(x_BLD), k_mlp), cache


def stacked_blocks(cfg, causal: bool, rngs: nnx.Rngs):
    """N blocks whose params are stacked on a leading axis (one init per layer, vmapped)."""
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(cfg, causal=causal, rngs=rngs)

    return make(rngs)


def run_blocks(blocks, x_BLD, *, n_layers: int, scan: bool, remat: bool, mask_BM=None, cache=None, pos=0,
               key=None, layer_states=None):
    """x through the N stacked blocks: a lax.scan over them, or a Python loop over their slices.

    cache is None or (k_NBMHK, v_NBMHK) under scan, one (k_BMHK, v_BMHK) per layer in the loop.
    layer_states: every layer's weights already sliced out of the stack (see Transformer.decoder).
    """
    graphdef, block_state = nnx.split(blocks)
    keys_N = None if key is None else jax.random.split(key, n_layers)

    def apply(x_BLD, layer_state, layer_cache, layer_key):
        return nnx.merge(graphdef, layer_state)(x_BLD, mask_BM=mask_BM, cache=layer_cache, pos=pos, key=layer_key)

    apply = jax.checkpoint(apply) if remat else apply
    if scan:
        def body(x_BLD, xs):
            return apply(x_BLD, *xs)

        return jax.lax.scan(body, x_BLD, (block_state, cache, keys_N))
    new_cache = []
    for i in range(n_layers):
        layer_state = layer_states[i] if layer_states else jax.tree.map(lambda a: a[i], block_state)
        x_BLD, layer_cache = apply(x_BLD, layer_state, None if cache is None else cache[i],
                                   None if keys_N is None else keys_N[i])
        new_cache.append(layer_cache)
    return x_BLD, (None if cache is None else tuple(new_cache))


class Transformer(nnx.Module):
    """Token embeddings (+ learned positions unless rotary), N pre-LN causal blocks, final LN, tied head."""

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
        # Plain hashable fields only: they become part of the static graph definition.
        self.n_layers, self.n_heads, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        self.block_size, self.dtype = cfg.block_size, jnp.dtype(cfg.dtype)
        self.scan_layers, self.remat = cfg.scan_layers, cfg.remat
        self.attention = cfg.get("attention", "auto")
        std = nnx.initializers.normal(0.02)
        self.wte = quant.embed(cfg)(vocab_size, cfg.d_model, embedding_init=std, rngs=rngs)
        self.wpe = position_table(cfg, rngs)
        self.drop = nnx.Dropout(cfg.dropout)
        self.blocks = stacked_blocks(cfg, causal=True, rngs=rngs)
        self.ln_f = nnx.LayerNorm(cfg.d_model, use_bias=cfg.bias, epsilon=1e-5, rngs=rngs)

    def init_cache(self, batch: int, length: int | None = None):
        """Zeroed keys and values: one (k_BMHK, v_BMHK) per layer ((k_XMK, v_XMK) for the CPU attention),
        stacked on a leading N axis under scan-over-layers."""
        M, H, K = length or self.block_size, self.n_heads, self.d_model // self.n_heads
        layer = attention_cpu.init_cache(batch, M, H, K, self.dtype) if cpu_attention(self.attention) else \
            (jnp.zeros((batch, M, H, K), self.dtype),) * 2
        if self.scan_layers:
            return tuple(jnp.broadcast_to(c, (self.n_layers, *c.shape)) for c in layer)
        return tuple(layer for _ in range(self.n_layers))

    def decoder(self):
        """This model's call with each layer's weights sliced out of the stack once, here.

        For decode loops (core/sampler.py): sliced inside the loop, XLA-CPU copies every layer's
        weights out of the stack on every iteration.
        """
        if self.scan_layers:
            return self
        state = nnx.state(self.blocks)
        return partial(self, layer_states=[jax.tree.map(lambda a: a[i], state) for i in range(self.n_layers)])

    def __call__(self, idx_BL, *, key=None, cache=None, pos=0, layer_states=None):
        """logits_BLV for tokens at positions pos..pos+L-1; with a cache, (logits_BLV, cache).

        key: a PRNG key enables dropout (training); None is deterministic.
        """
        B, L = idx_BL.shape
        k_emb, k_blocks = (None, None) if key is None else jax.random.split(key)
        x_BLD = self.wte(idx_BL)
        if self.wpe is not None:  # rotary positions (pos_emb=rope) enter in the attention instead
            x_BLD = x_BLD + self.wpe(pos + jnp.arange(L))[None]
        x_BLD = x_BLD.astype(self.dtype)
        x_BLD = x_BLD if k_emb is None else self.drop(x_BLD, rngs=k_emb)
        x_BLD, cache = run_blocks(self.blocks, x_BLD, n_layers=self.n_layers, scan=self.scan_layers,
                                  remat=self.remat, cache=cache, pos=pos, key=k_blocks, layer_states=layer_states)
        x_BLD = self.ln_f(x_BLD.astype(jnp.float32))
        # The tied head as one 2-D matmul: XLA-CPU runs 2-D dots and their gradients faster than 3-D ones.
        logits_BLV = self.wte.attend(x_BLD.reshape(B * L, -1)).reshape(B, L, -1)
        return logits_BLV if cache is None else (logits_BLV, cache)


Model = Transformer
