"""The token ids text models read (data/wordpiece.py numbers them so), and word dropout over them.

Models import nothing from data/, so the numbering is restated here; tests/test_encoder.py checks
that the two agree.
"""
import jax
import jax.numpy as jnp

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)  # [PAD] [UNK] [CLS] [SEP] [MASK]
FIRST_WORD_ID = 5  # every id from here on is a word piece


def word_dropout(ids_BL, key, rate: float, to_id: int):
    """ids_BL with each word piece (never a special token) replaced by `to_id` with probability `rate`."""
    hit_BL = jax.random.bernoulli(key, rate, ids_BL.shape) & (ids_BL >= FIRST_WORD_ID)
    return jnp.where(hit_BL, to_id, ids_BL)


def word_deletion(ids_BL, key, rate: float):
    """ids_BL with each word piece deleted with probability `rate`: the rest (specials kept) move left
    in order, and [PAD] fills the row's end, so every model reads a shorter text it knows how to read."""
    L = ids_BL.shape[-1]
    drop_BL = jax.random.bernoulli(key, rate, ids_BL.shape) & (ids_BL >= FIRST_WORD_ID)
    pos_L = jnp.arange(L)
    order_BL = jnp.argsort(jnp.where(drop_BL, L + pos_L, pos_L), axis=-1)  # kept first, in their order
    return jnp.take_along_axis(jnp.where(drop_BL, PAD_ID, ids_BL), order_BL, axis=-1)
