"""Bidirectional transformer encoder in Flax NNX (BERT, pre-LN): masked-LM pretraining, then classification.

Shape key: B batch, L length, D model width, V vocab, Y classes, P predicted positions per row.

Token + learned position (+ optional segment) embeddings, N pre-LN blocks of model/transformer.py
(`pos_emb=rope`: rotary positions in their attention instead of the table) with `causal=False` and
a key padding mask, a final LayerNorm: the body. [PAD] is token id 0
(data/wordpiece.py): positions holding it are never attended to, so padding changes no real
position's output. Built without `num_classes` the model has the masked-LM head (dense, GELU,
LayerNorm, output tied to the token embedding plus a bias) under `mlm_head/` (and with `nsp`, BERT's
next-sentence head on the [CLS] output under `nsp_head/`); with `num_classes`,
a classifier (pooled [CLS] or mean of the real tokens, dropout, dense) under `classifier/`. The body
has the same param paths in both, so `init_from=PRETRAINING_RUN` loads it and leaves the head fresh.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from model import quant
from model.matmul import DOT_GENERAL
from model.transformer import check_pos_emb, dense_factory, position_table, run_blocks, stacked_blocks
from model.wordpiece_ids import MASK_ID, PAD_ID, word_dropout

TASKS = ("mlm", "classify")
INPUTS = ("text",)


@dataclass
class Config:
    family: str = "encoder"
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 256
    mlp_ratio: int = 4
    # Positions the model has (BERT's max_position_embeddings). Named as model=transformer's key so
    # that core/config.py's check of data.seq_len <= model.block_size covers the encoder too.
    block_size: int = 128
    pos_emb: str = "learned"  # learned (BERT's table) | rope (rotary, model/transformer.py): offsets only
    type_vocab: int = 0  # segment embeddings: 0 none; 2 BERT's sentence A/B (segments_BL, default all A)
    dropout: float = 0.1
    # Training only: each word token (not [CLS]/[SEP]/[PAD]) becomes [MASK] with this probability,
    # the word dropout of LSTM text classifiers; [MASK] because a pretrained body has seen it.
    word_dropout: float = 0.0
    bias: bool = True
    dtype: str = "float32"  # compute dtype; params stay float32
    matmul_dtype: str = "float32"  # bfloat16 | auto, as for the decoder (model/transformer.py)
    scan_layers: bool = False
    remat: bool = False
    pooling: str = "cls"  # classifier input: cls (the [CLS] position) | mean (of the real tokens)
    # Set by compress.py in the runs it writes, never for training: int8 dense layers (model/quant.py);
    # quant_embeddings: the token embedding (tied to the masked-LM output) too.
    quant: str = "none"
    quant_embeddings: bool = False


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    quant.check(cfg)
    check_pos_emb(cfg)
    if cfg.matmul_dtype not in DOT_GENERAL:
        raise UserError(f"model.matmul_dtype={cfg.matmul_dtype} must be float32, bfloat16 or auto")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    if cfg.block_size <= 0 or cfg.n_layers <= 0:
        raise UserError("model.block_size and model.n_layers must be positive")
    if cfg.pooling not in ("cls", "mean"):
        raise UserError(f"model.pooling={cfg.pooling} must be cls or mean")
    if not 0.0 <= cfg.word_dropout < 1.0:
        raise UserError(f"model.word_dropout={cfg.word_dropout} must be in [0, 1)")
    if cfg.type_vocab < 0:
        raise UserError(f"model.type_vocab={cfg.type_vocab} must be 0 (no segments) or the segment count (2)")


def _norm(cfg, rngs):
    return nnx.LayerNorm(cfg.d_model, use_bias=cfg.bias, epsilon=1e-5, rngs=rngs)


class MLMHead(nnx.Module):
    """Dense D -> D, GELU, LayerNorm; the output matmul is the token embedding's (tied), plus a bias."""

    def __init__(self, cfg, vocab_size: int, rngs: nnx.Rngs):
        self.dense = dense_factory(cfg, rngs)(cfg.d_model, cfg.d_model, kernel_init=nnx.initializers.normal(0.02))
        self.ln = _norm(cfg, rngs)
        self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    def __call__(self, x_BPD, wte):
        B, P, D = x_BPD.shape
        h_BPD = self.ln(jax.nn.gelu(self.dense(x_BPD), approximate=True).astype(jnp.float32))
        # One 2-D matmul: XLA-CPU runs 2-D dots and their gradients faster than 3-D ones.
        return wte.attend(h_BPD.reshape(B * P, D)).reshape(B, P, -1) + self.bias[...]


class NSPHead(nnx.Module):
    """Next-sentence prediction from the [CLS] output: BERT's pooler (dense D -> D, tanh), then dense -> 2."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        std = nnx.initializers.normal(0.02)
        self.pooler = dense_factory(cfg, rngs)(cfg.d_model, cfg.d_model, kernel_init=std)
        self.out = dense_factory(cfg, rngs)(cfg.d_model, 2, kernel_init=std)

    def __call__(self, x_BD):
        return self.out(jnp.tanh(self.pooler(x_BD))).astype(jnp.float32)


class Encoder(nnx.Module):
    """The body (embeddings, N bidirectional blocks, final LN) and one head: masked LM or classifier."""

    def __init__(self, cfg, *, vocab_size: int, num_classes: int | None = None, nsp: bool = False, rngs: nnx.Rngs):
        # Plain hashable fields only: they become part of the static graph definition.
        self.n_layers, self.dtype = cfg.n_layers, jnp.dtype(cfg.dtype)
        self.scan_layers, self.remat, self.pooling = cfg.scan_layers, cfg.remat, cfg.pooling
        self.word_dropout = float(cfg.get("word_dropout", 0.0))  # configs from before the key: off
        std = nnx.initializers.normal(0.02)
        self.wte = quant.embed(cfg)(vocab_size, cfg.d_model, embedding_init=std, rngs=rngs)
        self.wpe = position_table(cfg, rngs)
        self.wse = nnx.Embed(cfg.type_vocab, cfg.d_model, embedding_init=std, rngs=rngs) if cfg.type_vocab else None
        self.drop = nnx.Dropout(cfg.dropout)
        self.blocks = stacked_blocks(cfg, causal=False, rngs=rngs)
        self.ln_f = _norm(cfg, rngs)
        if num_classes is None:
            self.mlm_head = MLMHead(cfg, vocab_size, rngs)
            if nsp:  # task.nsp: sentence pairs [CLS] A [SEP] B [SEP], told apart by segment embeddings
                if cfg.type_vocab < 2:
                    raise UserError(f"task.nsp=true feeds sentence pairs, and model.type_vocab={cfg.type_vocab} "
                                    f"gives them no segment embeddings; set model.type_vocab=2")
                self.nsp_head = NSPHead(cfg, rngs)
        else:
            self.classifier = quant.linear(cfg)(cfg.d_model, num_classes, kernel_init=std, rngs=rngs)

    def encode(self, ids_BL, *, key=None, segments_BL=None):
        """(x_BLD: the final LN's output, real_BL: True where the token is not [PAD])."""
        ids_BL = jnp.asarray(ids_BL)  # numpy ids too, as the other families take them
        B, L = ids_BL.shape
        k_emb, k_blocks = (None, None) if key is None else jax.random.split(key)
        if key is not None and self.word_dropout > 0:  # its own stream: other keys stay as without it
            ids_BL = word_dropout(ids_BL, jax.random.fold_in(key, 1), self.word_dropout, MASK_ID)
        x_BLD = self.wte(ids_BL)
        if self.wpe is not None:  # rotary positions (pos_emb=rope) enter in the attention instead
            x_BLD = x_BLD + self.wpe(jnp.arange(L))[None]
        if self.wse is not None:
            x_BLD = x_BLD + self.wse(jnp.zeros_like(ids_BL) if segments_BL is None else segments_BL)
        x_BLD = x_BLD.astype(self.dtype)
        x_BLD = x_BLD if k_emb is None else self.drop(x_BLD, rngs=k_emb)
        real_BL = ids_BL != PAD_ID
        # Key 0 ([CLS]) is always allowed: a row of nothing but [PAD] then gives numbers, not NaN.
        x_BLD, _ = run_blocks(self.blocks, x_BLD, n_layers=self.n_layers, scan=self.scan_layers, remat=self.remat,
                              mask_BM=real_BL.at[:, 0].set(True), key=k_blocks)
        return self.ln_f(x_BLD.astype(jnp.float32)), real_BL

    def __call__(self, ids_BL, *, key=None, segments_BL=None, positions_BP=None):
        """Masked LM: logits_BLV (or logits_BPV at `positions_BP` only); classifier: logits_BY.

        key: a PRNG key enables dropout (training); None is deterministic.
        """
        k_body, k_head = (None, None) if key is None else jax.random.split(key)
        x_BLD, real_BL = self.encode(ids_BL, key=k_body, segments_BL=segments_BL)
        if hasattr(self, "mlm_head"):
            if positions_BP is not None:  # the head's V-wide matmul only where there is something to predict
                x_BLD = jnp.take_along_axis(x_BLD, positions_BP[..., None], axis=1)
            return self.mlm_head(x_BLD, self.wte)
        if self.pooling == "cls":
            x_BD = x_BLD[:, 0]
        else:
            w_BL = real_BL.astype(jnp.float32)
            x_BD = (x_BLD * w_BL[..., None]).sum(1) / jnp.maximum(w_BL.sum(1, keepdims=True), 1.0)
        x_BD = x_BD if k_head is None else self.drop(x_BD, rngs=k_head)
        return self.classifier(x_BD).astype(jnp.float32)

    def pretrain(self, ids_BL, segments_BL, positions_BP, *, key=None):
        """(masked-LM logits_BPV at positions_BP, next-sentence logits_B2): one pass of the body for both."""
        x_BLD, _ = self.encode(ids_BL, key=key, segments_BL=segments_BL)
        x_BPD = jnp.take_along_axis(x_BLD, positions_BP[..., None], axis=1)
        return self.mlm_head(x_BPD, self.wte), self.nsp_head(x_BLD[:, 0])


Model = Encoder
