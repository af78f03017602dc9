"""Autoregressive sampling: prefill the prompt, then one jitted `lax.scan` over decode steps.

Any model with `init_cache(batch)` and `model(idx_BL, cache=, pos=) -> (logits_BLV, cache)`
samples here. Models with a finite context (`block_size` T) slide: when the cache is full,
the most recent T/2 tokens are prefilled again at positions 0..T/2-1 and decoding goes on,
so any number of tokens can be generated with every token seeing at least T/2 of context.
"""
import jax
import jax.numpy as jnp
from flax import nnx


def pick(logits_BV, key, temperature: float, top_k: int, top_p: float):
    """Next tokens_B from logits: greedy at temperature 0, else filtered (top-k, top-p) sampling."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def generate(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0):
    """New tokens_BN after the prompt, with the KV cache (or recurrent carry). Jit the caller."""
    B, P = prompt_BP.shape
    T = getattr(model, "block_size", None)
    if T is not None and P > T:
        prompt_BP, P = prompt_BP[:, -T:], T
    cache = model.init_cache(B)
    logits_BPV, cache = model(prompt_BP, cache=cache, pos=0)
    window_BT = None if T is None else jnp.zeros((B, T), jnp.int32).at[:, :P].set(prompt_BP)

    def slide(carry):
        cache, window_BT, _ = carry
        keep = T // 2
        window_BT = jnp.zeros_like(window_BT).at[:, :keep].set(window_BT[:, T - keep:])
        _, cache = model(window_BT[:, :keep], cache=model.init_cache(B), pos=0)
        return cache, window_BT, jnp.int32(keep)

    def step(carry, i):
        cache, window_BT, pos, logits_BV = carry
        token_B = pick(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p)
        if T is not None:
            cache, window_BT, pos = jax.lax.cond(pos == T, slide, lambda c: c, (cache, window_BT, pos))
            window_BT = jax.lax.dynamic_update_slice(window_BT, token_B[:, None], (0, pos))
        logits_B1V, cache = model(token_B[:, None], cache=cache, pos=pos)
        return (cache, window_BT, pos + 1, logits_B1V[:, -1]), token_B

    carry = (cache, window_BT, jnp.int32(P), logits_BPV[:, -1])
    _, tokens_NB = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    return tokens_NB.T


def generate_uncached(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0):
    """nanoGPT's decode: run the model over the last T tokens for every new one (no cache).

    The reference the cached sampler is tested and benchmarked against.
    """
    B, P = prompt_BP.shape
    T = model.block_size
    buf_BS = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt_BP)

    def step(buf_BS, i):
        pos = P + i  # tokens so far
        start = jnp.maximum(pos - T, 0)
        window_BT = jax.lax.dynamic_slice(buf_BS, (0, start), (B, min(T, buf_BS.shape[1])))
        logits_BTV = model(window_BT)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, pos - start - 1, axis=1, keepdims=False)
        token_B = pick(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p)
        return jax.lax.dynamic_update_slice(buf_BS, token_B[:, None], (0, pos)), token_B

    _, tokens_NB = jax.lax.scan(step, buf_BS, jnp.arange(max_new_tokens))
    return tokens_NB.T


def compile_generate(graphdef, *, cached: bool = True, **options):
    """jit(params, rest, prompt_BP, key) -> tokens_BN for a fixed set of sampling options."""
    fn = generate if cached else generate_uncached

    @jax.jit
    def run(params, rest, prompt_BP, key):
        return fn(nnx.merge(graphdef, params, rest), prompt_BP, key, **options)

    return run
