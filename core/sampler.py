"""Autoregressive sampling: prefill the prompt, then decode in a jitted loop whose length is data.

Any model with `init_cache(batch)` and `model(idx_BL, cache=, pos=) -> (logits_BLV, cache)`
samples here: the transformer's cache is its keys and values, the RNN's its recurrent carry.
Models with a finite context (`block_size` T) slide: when the cache is full, the most recent
T/2 tokens are prefilled again at positions 0..T/2-1 and decoding goes on, so any number of
tokens can be generated with every token seeing at least T/2 of context.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The per-token draws run on a threefry4x32 key derived from the caller's key: XLA-CPU lowers the
# default threefry2x32 as a rolled while loop (two calls a token), threefry4x32 unrolled and fused
# (`python benchmarks/sampler_prng.py` measures both).
SAMPLING_PRNG = "threefry4x32"

# A decode call's Gumbel noise is drawn before its loop when it is at most this many floats (16 MiB),
# off the per-token path; else one step at a time. The tokens are the same either way.
NOISE_AHEAD = 1 << 22
NOISE_BLOCK = 64  # draws per vectorised call when drawing ahead: a short call draws at most this many unused

# compile_generate decodes up to this many tokens per call: one compiled program for any max_new_tokens.
# A call costs ~0.2 ms before its first token (the CPU config's weights sliced and cast), so
# sample.py's 500 tokens take one call.
CHUNK = 512

# sample.py runs XLA-CPU on one thread for a model of at most this many bytes of weights (small
# kernels gain nothing from a second thread), and on one per core above it (core/runtime.py).
ONE_THREAD_MAX_BYTES = 1 << 24


def cpu_threads_for(param_bytes: int) -> int:
    """XLA-CPU threads for sampling a model with `param_bytes` of weights: 1, or 0 for one per core."""
    return 1 if param_bytes <= ONE_THREAD_MAX_BYTES else 0


def sampling_key(key):
    """The sampler's own key, a pure function of `key`: same key, same tokens."""
    shape = jax.random.key_data(jax.random.key(0, impl=SAMPLING_PRNG)).shape
    return jax.random.wrap_key_data(jax.random.bits(key, shape, jnp.uint32), impl=SAMPLING_PRNG)


def gumbel(key, shape):
    """The noise of one categorical draw: argmax(logits + gumbel(key, logits.shape)) samples softmax(logits)."""
    return jax.random.gumbel(key, shape, jnp.float32)


def pick(logits_BV, key, temperature: float, top_k: int, top_p: float, noise_BV=None):
    """Next tokens_B from logits: greedy at temperature 0, else filtered (top-k, top-p) sampling.

    noise_BV: this draw's `gumbel(key, logits_BV.shape)` when it was drawn ahead (same tokens either way).
    """
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
    noise_BV = gumbel(key, logits_BV.shape) if noise_BV is None else noise_BV
    return jnp.argmax(logits_BV + noise_BV, axis=-1).astype(jnp.int32)


def pick_row(logits_1V, key, temperature, top_k, top_p):
    """`pick` for one row whose settings are traced values, not constants: a server batch mixes them.

    The same token as `pick(logits_1V, key, temperature, top_k, top_p)` for the same key: the k-th
    largest logit and the top-p cutoff are the same thresholds, taken from one sort.
    """
    logits_1V = logits_1V.astype(jnp.float32)
    greedy = jnp.argmax(logits_1V, axis=-1).astype(jnp.int32)
    scaled_1V = logits_1V / jnp.where(temperature > 0, temperature, 1.0)
    sorted_1V = jnp.sort(scaled_1V, axis=-1)[:, ::-1]
    kth_11 = jax.lax.dynamic_slice_in_dim(sorted_1V, jnp.clip(top_k - 1, 0, logits_1V.shape[-1] - 1), 1, axis=-1)
    scaled_1V = jnp.where((top_k > 0) & (scaled_1V < kth_11), -jnp.inf, scaled_1V)
    sorted_1V = jnp.where((top_k > 0) & (sorted_1V < kth_11), -jnp.inf, sorted_1V)
    probs_1V = jax.nn.softmax(sorted_1V, axis=-1)
    keep_1V = (jnp.cumsum(probs_1V, axis=-1) - probs_1V) < top_p
    cutoff_11 = jnp.min(jnp.where(keep_1V, sorted_1V, jnp.inf), axis=-1, keepdims=True)
    scaled_1V = jnp.where((top_p < 1.0) & (scaled_1V < cutoff_11), -jnp.inf, scaled_1V)
    sampled = jnp.argmax(scaled_1V + gumbel(key, scaled_1V.shape), axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def start(model, prompt_BP, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """(the decode state after the prompt, its first new token_B or None). Jit the caller.

    A one-token prompt is not prefilled: `decode` feeds it (the decode step at the same shapes is
    the same computation), so for sample.py's default prompt this only makes the zeroed state. A
    longer one is prefilled in one call and the first token picked from its last logits.
    """
    B, P = prompt_BP.shape
    T = getattr(model, "block_size", None)
    if T is not None and P > T:
        prompt_BP, P = prompt_BP[:, -T:], T
    prompt_BP = prompt_BP.astype(jnp.int32)
    state = {"i": jnp.int32(0), "pos": jnp.int32(0), "next_B": prompt_BP[:, 0], "cache": model.init_cache(B)}
    if T is not None:  # the tokens at the cache's positions: a slide prefills their last half again
        state["window_BT"] = jnp.zeros((B, T), jnp.int32).at[:, :P].set(prompt_BP)
    if P == 1:
        return state, None
    logits_BPV, cache = model(prompt_BP, cache=state["cache"], pos=0)
    token_B = pick(logits_BPV[:, -1], jax.random.fold_in(sampling_key(key), 0), temperature, top_k, top_p)
    return state | {"cache": cache, "i": jnp.int32(1), "pos": jnp.int32(P), "next_B": token_B}, token_B


def decode(model, state, key, n, *, chunk: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """(state, tokens_BC): the next `n` <= C = `chunk` new tokens (n may be traced); columns n.. unused.

    One decode step, compiled once, in a while loop whose trip count is data: the program is the
    same for any number of tokens. A step feeds the last token at `pos` and picks the next one from
    its logits with the key fold_in(key, i) for the i-th new token. A full cache slides between two
    runs of that loop. The draws' noise is drawn before the loops, as many blocks as `n` needs, when
    C draws fit NOISE_AHEAD (the same numbers as drawing in the loop).
    """
    T = getattr(model, "block_size", None)
    init_cache, keep = model.init_cache, None if T is None else T // 2
    model = model.decoder() if hasattr(model, "decoder") else model  # weights sliced once, not per step
    key, i0, (B,) = sampling_key(key), state["i"], state["next_B"].shape
    noise_CBV = None
    if temperature != 0:
        V = jax.eval_shape(lambda s: model(s["next_B"][:, None], cache=s["cache"], pos=s["pos"])[0], state).shape[-1]
        if chunk * B * V <= NOISE_AHEAD:  # in blocks of R, as many as n needs: a short call draws little
            R = min(chunk, NOISE_BLOCK)

            def draw(b, noise_CBV):
                noise_RBV = jax.vmap(lambda i: gumbel(jax.random.fold_in(key, i), (B, V)))(i0 + b * R + jnp.arange(R))
                return jax.lax.dynamic_update_slice(noise_CBV, noise_RBV, (b * R, 0, 0))

            noise_CBV = jax.lax.fori_loop(0, (n + R - 1) // R, draw, jnp.zeros((-(-chunk // R) * R, B, V), jnp.float32))

    def step(carry):
        state, tokens_BC = carry
        pos, i, next_B = state["pos"], state["i"], state["next_B"]
        logits_B1V, cache = model(next_B[:, None], cache=state["cache"], pos=pos)
        noise_BV = None if noise_CBV is None else noise_CBV[i - i0]
        token_B = pick(logits_B1V[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p, noise_BV)
        new = {"cache": cache, "pos": pos + 1, "i": i + 1, "next_B": token_B}
        if T is not None:
            new["window_BT"] = jax.lax.dynamic_update_slice(state["window_BT"], next_B[:, None], (0, pos))
        return state | new, jax.lax.dynamic_update_slice(tokens_BC, token_B[:, None], (0, i - i0))

    def slide(state):
        """The last T/2 tokens prefilled again at 0..T/2-1; the logits from before it were already picked from."""
        last_BK = state["window_BT"][:, T - keep:]
        _, cache = model(last_BK, cache=init_cache(B), pos=0)
        window_BT = state["window_BT"].at[:, :keep].set(last_BK)
        return state | {"cache": cache, "pos": jnp.int32(keep), "window_BT": window_BT}

    def more(carry):
        return carry[0]["i"] - i0 < n

    def window(carry):
        """Steps until `n` tokens or a full cache: no multi-row matmul, so XLA-CPU may run it as one function."""
        return jax.lax.while_loop(lambda c: more(c) & (c[0]["pos"] < T), step, carry)

    carry = (state, jnp.zeros((B, chunk), jnp.int32))
    if T is None:
        return jax.lax.while_loop(more, step, carry)
    # The rest of this window, then (slide, window) while tokens remain. The window loop compiles twice,
    # but no lax.cond decides the slide: one cost ~5% of batch-1 tokens/s (benchmarks/README.md).
    return jax.lax.while_loop(more, lambda c: window((slide(c[0]), c[1])), window(carry))


def generate(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0):
    """New tokens_BN after the prompt, with the KV cache (or recurrent carry). Jit the caller.

    `start`, then `decode` of the rest in one call: the same tokens as `compile_generate`'s run.
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    state, first_B = start(model, prompt_BP, key, **options)
    n = max_new_tokens - (first_B is not None)
    tokens_BN = decode(model, state, key, n, chunk=n, **options)[1] if n else jnp.zeros((len(prompt_BP), 0), jnp.int32)
    return tokens_BN if first_B is None else jnp.concatenate([first_B[:, None], tokens_BN], axis=1)


def generate_uncached(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0):
    """nanoGPT's decode: run the model over the last T tokens for every new one (no cache).

    The reference the cached sampler is tested and benchmarked against.
    """
    B, P = prompt_BP.shape
    key = sampling_key(key)
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
    """run(params, rest, prompt_BP, key) -> tokens_BN (numpy) for a fixed set of sampling options.

    Cached: `start`, then `decode` called for up to CHUNK tokens at a time with its state donated, so
    any `max_new_tokens` runs the same two programs: compiled once per process, loaded from the
    persistent compilation cache by the next. Uncached: one jitted program.
    """
    if not cached:
        @jax.jit
        def run_uncached(params, rest, prompt_BP, key):
            return generate_uncached(nnx.merge(graphdef, params, rest), prompt_BP, key, **options)

        return run_uncached
    n_total = options.pop("max_new_tokens")
    programs = {}

    def start_program(params, rest, prompt_BP, key):
        return start(nnx.merge(graphdef, params, rest), prompt_BP, key, **options)

    def decode_program(params, rest, state, key, n):
        return decode(nnx.merge(graphdef, params, rest), state, key, n, chunk=CHUNK, **options)

    def jitted(params):
        """start and decode, with their state replicated on the params' devices whether it comes from
        `start` or from `decode` itself, so `decode` compiles once."""
        sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if sharding not in programs:
            programs[sharding] = (jax.jit(start_program, out_shardings=sharding),
                                  jax.jit(decode_program, out_shardings=sharding, donate_argnums=2))
        return programs[sharding]

    def run(params, rest, prompt_BP, key):
        start_jit, decode_jit = jitted(params)
        state, first_B = start_jit(params, rest, prompt_BP, key)
        parts = [] if first_B is None else [(first_B[:, None], 1)]
        done = len(parts)
        while done < n_total:  # dispatched without waiting: the host knows every call's length
            n = min(CHUNK, n_total - done)
            state, tokens_BC = decode_jit(params, rest, state, key, np.int32(n))
            parts.append((tokens_BC, n))
            done += n
        return np.concatenate([np.asarray(t)[:, :n] for t, n in parts], axis=1)  # on the host: no program per n

    return run
