"""Autoregressive sampling: prefill the prompt, then one jitted `lax.scan` over decode steps.

Any model with `init_cache(batch)` and `model(idx_BL, cache=, pos=) -> (logits_BLV, cache)`
samples here: the transformer's cache is its keys and values, the RNN's its recurrent carry.
Models with a finite context (`block_size` T) slide: when the cache is full, the most recent
T/2 tokens are prefilled again at positions 0..T/2-1 and decoding goes on, so any number of
tokens can be generated with every token seeing at least T/2 of context.
"""
import jax
import jax.numpy as jnp
from flax import nnx

# The per-token draws run on a threefry4x32 key derived from the caller's key: XLA-CPU lowers the
# default threefry2x32 as a rolled while loop (two calls a token), threefry4x32 unrolled and fused
# (`python benchmarks/sampler_prng.py` measures both).
SAMPLING_PRNG = "threefry4x32"

# A decode segment's Gumbel noise is drawn before its loop when it is at most this many floats (16 MiB),
# off the per-token path; else one step at a time. The tokens are the same either way.
NOISE_AHEAD = 1 << 22

# sample.py runs XLA-CPU on one thread for a model of at most this many bytes of weights (small
# kernels gain nothing from a second thread), and on one per core above it (core/runtime.py).
ONE_THREAD_MAX_BYTES = 1 << 24
XLA_SMALL_LOOP_DEFAULT = 1024  # XLA-CPU's own small-while-loop threshold (core/runtime.py raises it)


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


def decode_unroll(model, cache, batch: int, small_loop_bytes: int = XLA_SMALL_LOOP_DEFAULT) -> int:
    """Decode steps per loop iteration: 1 where XLA-CPU runs the loop as one function, else 4.

    A batch-1 decode step has no multi-row matmul, so when its weights and cache are well under
    `small_loop_bytes` (XLA_FLAGS' threshold, core/runtime.py) XLA-CPU compiles the whole loop into one
    function: unrolling gains nothing there and makes the compile several times longer. A loop run
    kernel by kernel (bigger models, batch > 1, other backends) saves per-iteration overhead with 4
    steps per iteration.
    """
    step_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((nnx.state(model), cache)))
    one_function = jax.default_backend() == "cpu" and batch == 1 and 2 * step_bytes < small_loop_bytes
    return 1 if one_function else 4


def generate(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, small_loop_bytes: int = XLA_SMALL_LOOP_DEFAULT):
    """New tokens_BN after the prompt, with the KV cache (or recurrent carry). Jit the caller.

    A finite context is decoded in segments with static lengths, so no step inside a scan ever
    branches: the first segment fills the context after the prompt, and each later one re-prefills
    the last T/2 tokens into a fresh cache and decodes T - T/2 more (an outer scan over segments).
    """
    B, P = prompt_BP.shape
    key = sampling_key(key)
    T = getattr(model, "block_size", None)
    if T is not None and P > T:
        prompt_BP, P = prompt_BP[:, -T:], T
    logits_BPV, cache = model(prompt_BP, cache=model.init_cache(B), pos=0)
    init_cache = model.init_cache
    unroll = decode_unroll(model, cache, B, small_loop_bytes)
    model = model.decoder() if hasattr(model, "decoder") else model  # weights sliced once, not per step

    def decode(cache, pos, logits_BV, first: int, n: int):
        """n tokens numbered first.. (for their keys), the first written at `pos`."""
        i_N = first + jnp.arange(n)
        ahead = temperature != 0 and n * logits_BV.size <= NOISE_AHEAD
        # The segment's draws in one vectorised call before the loop: the same numbers, off the per-token path.
        noise_NBV = jax.vmap(lambda i: gumbel(jax.random.fold_in(key, i), logits_BV.shape))(i_N) if ahead else None

        def step(carry, xs):
            (cache, pos, logits_BV), (i, noise_BV) = carry, xs
            token_B = pick(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p, noise_BV)
            logits_B1V, cache = model(token_B[:, None], cache=cache, pos=pos)
            return (cache, pos + 1, logits_B1V[:, -1]), token_B

        (_, _, logits_BV), tokens_NB = jax.lax.scan(step, (cache, pos, logits_BV), (i_N, noise_NBV),
                                                    unroll=min(unroll, max(n, 1)))
        return logits_BV, tokens_NB.T

    if T is None:  # a recurrent carry: no context limit
        return decode(cache, jnp.int32(P), logits_BPV[:, -1], 0, max_new_tokens)[1]
    n0 = min(max_new_tokens, T - P)
    logits_BV, tokens_BN = decode(cache, jnp.int32(P), logits_BPV[:, -1], 0, n0)
    rest = max_new_tokens - n0
    if rest == 0:
        return tokens_BN
    keep = T // 2
    per_segment = T - keep
    last_BK = jnp.concatenate([prompt_BP, tokens_BN], axis=1)[:, -keep:]

    def segment(carry, s):
        last_BK, logits_BV = carry
        _, cache = model(last_BK, cache=init_cache(B), pos=0)
        logits_BV, new_BS = decode(cache, jnp.int32(keep), logits_BV, n0 + s * per_segment, per_segment)
        return (new_BS[:, -keep:], logits_BV), new_BS

    n_segments = -(-rest // per_segment)
    _, segments_SBN = jax.lax.scan(segment, (last_BK, logits_BV), jnp.arange(n_segments))
    tail_BN = segments_SBN.transpose(1, 0, 2).reshape(B, -1)[:, :rest]
    return jnp.concatenate([tokens_BN, tail_BN], axis=1)


def generate_uncached(model, prompt_BP, key, *, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, small_loop_bytes: int = 0):
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
    """jit(params, rest, prompt_BP, key) -> tokens_BN for a fixed set of sampling options."""
    fn = generate if cached else generate_uncached

    @jax.jit
    def run(params, rest, prompt_BP, key):
        return fn(nnx.merge(graphdef, params, rest), prompt_BP, key, **options)

    return run
