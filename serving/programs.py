"""The compiled programs a language-model server runs: prefill into slots, decode a chunk, slide a slot.

The server keeps S slots, each one sequence's KV cache (or recurrent carry) and next-token logits,
stacked on a leading S axis. Every program is compiled ahead of time for fixed shapes (a prompt
bucket, a batch bucket), so nothing compiles while serving. A decode chunk runs K steps over the
first b slots, each slot at its own position and with its
own sampling settings: the model's batch-1 call is vmapped over the slots, so any model with
`init_cache(batch)` and `model(idx_BL, cache=, pos=)` serves, as it samples (core/sampler.py).

Token for token the same as `sample.py` with `num_samples=1` for the same seed: the same key
schedule (`fold_in(sampling_key, i)` for the i-th new token), the same picks (`pick_row`), and the
same context slide (the scheduler re-prefills the last T/2 tokens when a slot's cache is full).
"""
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.sampler import SAMPLING_PRNG, pick_row, sampling_key


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` up to `largest`, and `largest` itself."""
    out = [smallest]
    while out[-1] * 2 < largest:
        out.append(out[-1] * 2)
    return sorted(set(out + [largest]))


def prefill_sizes(slots: int) -> list[int]:
    """Prompts prefilled per call: 1, 4, 16, ... up to `slots` (fewer programs than every power of two)."""
    out = [1]
    while out[-1] < slots:
        out.append(min(out[-1] * 4, slots))
    return out


def bucket_of(n: int, sizes: list[int]) -> int:
    """The smallest size >= n."""
    return next(s for s in sizes if s >= n)


@dataclass
class Programs:
    """The server's compiled programs and the device state they update (donated, in place)."""
    prefill: dict  # (k, prompt bucket L) -> compiled (params, rest, cache, logits_SV, prompts_kL, lengths_k, slots_k)
    slide: object  # compiled (params, rest, cache, tokens_1K, slot): re-prefill a full slot, logits kept
    decode: dict  # batch bucket b -> compiled (params, rest, cache, logits_SV, pos_b, count_b, key_bX,
    #               temperature_b, top_k_b, top_p_b) -> (cache, logits_SV, tokens_bK)
    key_data: object  # compiled (seed) -> the sampling key's data for that seed, as sample.py's
    block_size: int | None  # T: the context; None for a recurrent carry
    chunk: int  # K: decode steps per call


def build(model: nnx.Module, params, rest, *, slots: int, chunk: int, max_prompt: int) -> tuple:
    """(Programs, cache, logits_SV): every program compiled, the slots' zeroed state on device."""
    graphdef = nnx.graphdef(model)
    T = getattr(model, "block_size", None)
    one_cache = model.init_cache(1)
    V = model(jnp.zeros((1, 1), jnp.int32), cache=one_cache, pos=0)[0].shape[-1]
    cache = jax.tree.map(lambda c: jnp.zeros((slots, *c.shape), c.dtype), one_cache)
    logits_SV = jnp.zeros((slots, V), jnp.float32)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    state = (jax.tree.map(spec, params), jax.tree.map(spec, rest), jax.tree.map(spec, cache), spec(logits_SV))
    compiled = partial(_compile, graphdef=graphdef, T=T)
    prefill = {(k, L): compiled(_prefill, (*state, jax.ShapeDtypeStruct((k, L), jnp.int32),
                                           *[jax.ShapeDtypeStruct((k,), jnp.int32)] * 2), donate=(2, 3))
               for k in prefill_sizes(slots) for L in buckets(max_prompt, min(16, max_prompt))}
    slide = None if T is None else compiled(_slide, (*state[:3], jax.ShapeDtypeStruct((1, T // 2), jnp.int32), i32),
                                            donate=(2,))
    key_shape = jax.random.key_data(jax.random.key(0, impl=SAMPLING_PRNG)).shape
    decode = {}
    for b in buckets(slots):
        rows = [jax.ShapeDtypeStruct((b,), jnp.int32)] * 2 + [jax.ShapeDtypeStruct((b, *key_shape), jnp.uint32),
                                                              jax.ShapeDtypeStruct((b,), jnp.float32),
                                                              jax.ShapeDtypeStruct((b,), jnp.int32),
                                                              jax.ShapeDtypeStruct((b,), jnp.float32)]
        decode[b] = compiled(partial(_decode, steps=chunk), (*state, *rows), donate=(2, 3))
    key_data = jax.jit(lambda seed: jax.random.key_data(sampling_key(jax.random.key(seed)))).lower(i32).compile()
    return Programs(prefill, slide, decode, key_data, T, chunk), cache, logits_SV


def _compile(fn, shapes, *, graphdef, T, donate):
    return jax.jit(partial(fn, graphdef=graphdef, T=T), donate_argnums=donate).lower(*shapes).compile()


def _put(cache, logits_SV, one_cache, logits_V, slot):
    cache = jax.tree.map(lambda c, x: jax.lax.dynamic_update_index_in_dim(c, x.astype(c.dtype), slot, 0),
                         cache, one_cache)
    return cache, (None if logits_V is None else jax.lax.dynamic_update_index_in_dim(logits_SV, logits_V, slot, 0))


def _prefill_one(model, prompt_L, length, *, T, V):
    """(the prompt's batch-1 cache, the logits after its last real token); prompt_L is right-padded."""
    if T is not None:  # causal: the padding after `length` changes nothing before it, and is overwritten
        logits_1LV, one_cache = model(prompt_L[None], cache=model.init_cache(1), pos=0)
        return one_cache, jax.lax.dynamic_index_in_dim(logits_1LV[0], length - 1, 0, keepdims=False)

    def step(carry, xs):  # a recurrent carry must not see the padding: token by token, kept past `length`
        one_cache, logits_V = carry
        i, token = xs
        logits_11V, stepped = model(token[None, None], cache=one_cache, pos=i)
        live = i < length
        one_cache = jax.tree.map(lambda new, old: jnp.where(live, new, old), stepped, one_cache)
        return (one_cache, jnp.where(live, logits_11V[0, -1].astype(jnp.float32), logits_V)), None

    return jax.lax.scan(step, (model.init_cache(1), jnp.zeros(V)), (jnp.arange(len(prompt_L)), prompt_L))[0]


def _prefill(params, rest, cache, logits_SV, prompts_kL, lengths_k, slots_k, *, graphdef, T):
    """k prompts' caches into their slots and the logits after each one's last real token, in one call.

    Rows beyond the real prompts carry slot index S (out of range): their writes are dropped.
    """
    model = nnx.merge(graphdef, params, rest)
    caches, logits_kV = jax.vmap(partial(_prefill_one, model, T=T, V=logits_SV.shape[1]))(prompts_kL, lengths_k)
    cache = jax.tree.map(lambda c, x: c.at[slots_k].set(x.astype(c.dtype), mode="drop"), cache, caches)
    return cache, logits_SV.at[slots_k].set(logits_kV.astype(jnp.float32), mode="drop")


def _slide(params, rest, cache, tokens_1K, slot, *, graphdef, T):
    """A full slot's last K = T/2 tokens prefilled again at positions 0..K-1; its logits stay (sample.py's slide)."""
    model = nnx.merge(graphdef, params, rest)
    _, one_cache = model(tokens_1K, cache=model.init_cache(1), pos=0)
    return _put(cache, None, one_cache, None, slot)[0]


def _decode(params, rest, cache, logits_SV, pos_b, count_b, key_bX, temperature_b, top_k_b, top_p_b, *, graphdef, T,
            steps):
    """`steps` tokens for each of the first b slots.

    A slot whose cache fills mid-chunk (pos reaches T) stops advancing: its logits and counters freeze
    and the scheduler discards its later picks, then slides it; writes past T land on position T-1,
    which the slide rewrites anyway.
    """
    model = nnx.merge(graphdef, params, rest)
    model = model.decoder() if hasattr(model, "decoder") else model  # weights sliced once, not per step
    b = pos_b.shape[0]
    sub = jax.tree.map(lambda c: c[:b], cache)
    keys_b = jax.random.wrap_key_data(key_bX, impl=SAMPLING_PRNG)

    def one(one_cache, token, pos):
        logits_11V, one_cache = model(token[None, None], cache=one_cache, pos=pos)
        return logits_11V[0, -1].astype(jnp.float32), one_cache

    def pick(logits_V, key, count, temperature, top_k, top_p):
        return pick_row(logits_V[None], jax.random.fold_in(key, count), temperature, top_k, top_p)[0]

    def step(carry, _):
        sub, logits_bV, pos_b, count_b = carry
        token_b = jax.vmap(pick)(logits_bV, keys_b, count_b, temperature_b, top_k_b, top_p_b)
        live_b = pos_b < T if T is not None else jnp.ones_like(pos_b, bool)
        new_bV, sub = jax.vmap(one)(sub, token_b, pos_b if T is None else jnp.minimum(pos_b, T - 1))
        logits_bV = jnp.where(live_b[:, None], new_bV, logits_bV)
        return (sub, logits_bV, pos_b + live_b, count_b + live_b), token_b

    (sub, logits_bV, _, _), tokens_Kb = jax.lax.scan(step, (sub, logits_SV[:b], pos_b, count_b), None, length=steps)
    cache = jax.tree.map(lambda c, s: jax.lax.dynamic_update_slice_in_dim(c, s, 0, 0), cache, sub)
    return cache, jax.lax.dynamic_update_slice_in_dim(logits_SV, logits_bV, 0, 0), tokens_Kb.T


def valid_steps(programs: Programs, pos: int) -> int:
    """How many of a chunk's picks count for a slot starting at `pos` (all but those after its cache filled)."""
    return programs.chunk if programs.block_size is None else min(programs.chunk, programs.block_size - pos)


def seed_key(programs: Programs, seed: int) -> np.ndarray:
    return np.asarray(programs.key_data(np.int32(seed)))
