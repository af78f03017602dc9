"""The transformer: causality, cached decode, scan-over-layers and the sampler's filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, compose
from core import sampler
from core.config import check
from core.sampler import generate, generate_uncached, pick, sampling_key
from errors import UserError
from model import build

V = 13


def tiny_model(**overrides):
    cfg = compose(TINY + [f"model.{k}={v}" for k, v in overrides.items()])
    return build(cfg.model, {"vocab_size": V}, rngs=nnx.Rngs(0))


def test_no_gradient_flows_from_future_tokens():
    model = tiny_model(dropout=0.0)
    graphdef, params = nnx.split(model)
    L, t = 12, 5
    idx_BL = jax.random.randint(jax.random.key(1), (2, L), 0, V)

    # Position embedding row p is added at position p only: its gradient shows what position t reads.
    def out_at_t(params):
        return nnx.merge(graphdef, params)(idx_BL)[:, t].sum()

    grad_wpe = np.asarray(jax.jit(jax.grad(out_at_t))(params)["wpe"]["embedding"][...])
    assert np.all(grad_wpe[t + 1:] == 0.0), "future positions influence the present"
    assert np.all(np.abs(grad_wpe[: t + 1]).sum(-1) > 0), "every past position must matter"


def test_blocks_take_causal_and_a_padding_mask_as_an_encoder_needs():
    from model.transformer import Block

    cfg = compose(TINY).model
    x_BLD = jax.random.normal(jax.random.key(0), (2, 6, cfg.d_model))
    mask_BM = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    encoder, decoder = Block(cfg, causal=False, rngs=nnx.Rngs(0)), Block(cfg, causal=True, rngs=nnx.Rngs(0))
    y_BLD = encoder(x_BLD, mask_BM=mask_BM)[0]
    # Padding: what sits in padded positions changes no real position's output.
    noise = jax.random.normal(jax.random.key(1), (2, cfg.d_model))
    y_pad = encoder(x_BLD.at[0, 4:].set(noise), mask_BM=mask_BM)[0]
    np.testing.assert_allclose(np.asarray(y_pad[0, :4]), np.asarray(y_BLD[0, :4]), atol=1e-6)
    # Bidirectional: a later token changes an earlier position's output; causal: it does not.
    later = x_BLD.at[1, 5].set(3 * noise[0])  # a new direction (LayerNorm removes a constant shift)
    moved = np.abs(np.asarray(encoder(later, mask_BM=mask_BM)[0][1, 0]) - np.asarray(y_BLD[1, 0])).max()
    assert moved > 1e-6, moved
    np.testing.assert_allclose(np.asarray(decoder(later)[0][1, :5]), np.asarray(decoder(x_BLD)[0][1, :5]), atol=1e-6)
    # The same params either way: causal is a flag, not another layer.
    assert jax.tree.structure(nnx.state(encoder)) == jax.tree.structure(nnx.state(decoder))


@pytest.mark.parametrize("L", [12, 128], ids=["one-block", "query-blocks"])
def test_cpu_attention_layouts_compute_what_the_reference_does(L):
    """model/attention_cpu.py is a layout, not another model: same params, logits, gradients, tokens."""
    cfg = lambda impl: compose(TINY + [f"model.attention={impl}", "model.dropout=0.0", f"model.block_size={L}",  # noqa: E731
                                       f"data.seq_len={L}"]).model
    ref, cpu = (build(cfg(impl), {"vocab_size": V}, rngs=nnx.Rngs(0)) for impl in ("reference", "cpu"))
    idx_BL = jax.random.randint(jax.random.key(3), (2, L), 0, V)
    weights_BLV = jax.random.normal(jax.random.key(4), (2, L, V))

    def loss(model):
        graphdef, params = nnx.split(model)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(idx_BL) * weights_BLV)))(params)

    for a, b in zip(jax.tree.leaves(loss(ref)), jax.tree.leaves(loss(cpu)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    options = dict(max_new_tokens=L + 7, temperature=0.0)  # fills the cache and slides
    decode = lambda m: np.asarray(jax.jit(lambda p: generate(m, p, jax.random.key(0), **options))(idx_BL[:, :3]))  # noqa: E731
    np.testing.assert_array_equal(decode(ref), decode(cpu))
    from model.transformer import Block

    block_cfg = compose(TINY).model
    mask_BM = jnp.array([[1] * (L - 3) + [0] * 3, [1] * L])
    x_BLD = jax.random.normal(jax.random.key(5), (2, L, block_cfg.d_model))
    for causal in (False, True):  # the encoder's padding mask, with and without causality
        outs = [Block(compose(TINY + [f"model.attention={impl}"]).model, causal=causal, rngs=nnx.Rngs(1))(
            x_BLD, mask_BM=mask_BM)[0] for impl in ("reference", "cpu")]
        np.testing.assert_allclose(np.asarray(outs[0])[:, :L - 3], np.asarray(outs[1])[:, :L - 3], atol=1e-5)


def test_cached_greedy_decode_equals_uncached_up_to_block_size():
    model = tiny_model()
    T = model.block_size
    prompt_BP = jax.random.randint(jax.random.key(2), (3, 4), 0, V)
    n = T - 4  # fills the context exactly: no sliding on either side
    options = dict(max_new_tokens=n, temperature=0.0)
    cached = jax.jit(lambda p: generate(model, p, jax.random.key(0), **options))(prompt_BP)
    uncached = jax.jit(lambda p: generate_uncached(model, p, jax.random.key(0), **options))(prompt_BP)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    assert cached.shape == (3, n)


@pytest.mark.parametrize("attention", ["reference", "cpu"])
def test_rope_sees_offsets_only_and_its_cached_decode_equals_uncached(attention):
    """model.pos_emb=rope: no position table; a query-key score depends on the two positions' offset
    only; the keys are rotated before the cache write, so cached greedy decode equals recomputing."""
    from model.transformer import rope as rotate

    q_BLHK, k_BLHK = jax.random.normal(jax.random.key(0), (2, 2, 6, 2, 8))
    scores = lambda qpos, kpos: np.einsum("blhk,bmhk->bhlm", np.asarray(rotate(q_BLHK, qpos)),  # noqa: E731
                                          np.asarray(rotate(k_BLHK, kpos)))
    pos = jnp.arange(6)
    np.testing.assert_allclose(scores(pos + 9, pos + 9), scores(pos, pos), atol=1e-4)  # a common shift: the same
    np.testing.assert_allclose(scores(pos + 9, pos[::-1] + 9), scores(pos, pos[::-1]), atol=1e-4)
    assert np.abs(scores(pos, pos[::-1]) - scores(pos, pos)).max() > 1e-2  # other offsets: other scores
    with pytest.raises(UserError, match="model.pos_emb=alibi must be learned or rope"):
        check(compose(TINY + ["model.pos_emb=alibi"]))
    with pytest.raises(UserError, match="rotates pairs of each head's 5 dims"):
        check(compose(TINY + ["model.d_model=10", "model.n_heads=2", "model.pos_emb=rope"]))
    model = tiny_model(pos_emb="rope", attention=attention)
    assert model.wpe is None and "wpe" not in nnx.to_pure_dict(nnx.state(model))
    prompt_BP = jax.random.randint(jax.random.key(2), (3, 4), 0, V)
    options = dict(max_new_tokens=model.block_size - 4, temperature=0.0)
    cached = jax.jit(lambda p: generate(model, p, jax.random.key(0), **options))(prompt_BP)
    uncached = jax.jit(lambda p: generate_uncached(model, p, jax.random.key(0), **options))(prompt_BP)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))


def test_decode_past_block_size_and_seed_determinism():
    model = tiny_model()
    prompt_BP = jnp.zeros((2, 3), jnp.int32)
    gen = jax.jit(lambda k: generate(model, prompt_BP, k, max_new_tokens=3 * model.block_size,
                                     temperature=1.0, top_k=5, top_p=0.9))
    a, b, c = gen(jax.random.key(7)), gen(jax.random.key(7)), gen(jax.random.key(8))
    assert a.shape == (2, 3 * model.block_size)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert int(a.min()) >= 0 and int(a.max()) < V


def test_decode_past_block_size_slides_as_documented():
    """Greedy decoding past T equals recomputing over the window: after a full context the last
    T/2 tokens are kept and the window grows again from there (checked uncached, one token at a time)."""
    model = tiny_model()
    T, keep = model.block_size, model.block_size // 2
    prompt = [1, 2, 3]
    n = 2 * T + 5  # the first segment, two slides and part of a third segment
    cached = np.asarray(jax.jit(lambda p: generate(model, p, jax.random.key(0), max_new_tokens=n,
                                                   temperature=0.0))(jnp.array([prompt])))[0]
    forward = jax.jit(model)
    seq, start = list(prompt), 0
    for _ in range(n):
        if len(seq) - start > T:  # the token just appended does not fit: keep the last T/2 before it
            start = len(seq) - 1 - keep
        logits = forward(jnp.array([seq[start:] + [0] * (T - len(seq[start:]))]))[0, len(seq) - start - 1]
        seq.append(int(jnp.argmax(logits)))
    np.testing.assert_array_equal(cached, np.array(seq[len(prompt):]))


@pytest.mark.parametrize("prompt_len", [1, 3])
def test_sample_py_sampler_in_chunks_equals_one_traced_generate(monkeypatch, prompt_len):
    """compile_generate (sample.py's) runs `start` and `decode` apart, CHUNK tokens per call from a state
    carried between calls: token for token what one jitted `generate` gives."""
    monkeypatch.setattr(sampler, "CHUNK", 7)  # several calls, each ending mid-window and across slides
    model = tiny_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    prompt_BP = jax.random.randint(jax.random.key(2), (2, prompt_len), 0, V)
    for n in (1, 7, 2 * model.block_size + 5):
        options = dict(max_new_tokens=n, temperature=0.9, top_k=5, top_p=0.95)
        whole = np.asarray(jax.jit(lambda p: generate(model, p, jax.random.key(4), **options))(prompt_BP))
        chunked = sampler.compile_generate(graphdef, **options)(params, rest, np.asarray(prompt_BP), jax.random.key(4))
        np.testing.assert_array_equal(chunked, whole)


def test_scan_layers_matches_unrolled_and_shares_checkpoint_layout():
    unrolled, scanned = tiny_model(scan_layers=False), tiny_model(scan_layers=True, remat=True)
    s1, s2 = nnx.to_pure_dict(nnx.state(unrolled)), nnx.to_pure_dict(nnx.state(scanned))
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    idx = jax.random.randint(jax.random.key(3), (2, 16), 0, V)
    np.testing.assert_allclose(np.asarray(unrolled(idx)), np.asarray(scanned(idx)), atol=1e-5)
    decode = lambda m: np.asarray(jax.jit(lambda p: generate(m, p, jax.random.key(0), max_new_tokens=20,  # noqa: E731
                                                             temperature=0.0))(idx[:, :3]))
    np.testing.assert_array_equal(decode(unrolled), decode(scanned))  # the KV cache works under both
    qkv_N = np.asarray(unrolled.blocks.attn.qkv.kernel[...])
    assert not np.allclose(qkv_N[0], qkv_N[1]), "stacked layers must be initialised independently"


def test_top_k_and_top_p_filter_the_right_tokens():
    logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: {int(pick(logits_BV, k, 1.0, **kw)[0]) for k in keys}  # noqa: E731
    assert draw(top_k=2, top_p=1.0) == {0, 1}
    assert draw(top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    assert draw(top_k=0, top_p=0.4) == {0}
    assert draw(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert int(pick(logits_BV, keys[0], 0.0, 0, 1.0)[0]) == 0


def test_draws_follow_the_softmax_and_noise_drawn_ahead_changes_no_token(monkeypatch):
    logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(1), 4000)
    tokens = np.asarray(jax.vmap(lambda k: pick(logits_BV, k, 1.0, 0, 1.0)[0])(keys))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)

    model = tiny_model()
    prompt_BP = jax.random.randint(jax.random.key(2), (2, 3), 0, V)
    options = dict(max_new_tokens=2 * model.block_size + 5, temperature=0.9, top_k=20, top_p=0.95)  # slides too
    ahead = np.asarray(jax.jit(lambda p: generate(model, p, jax.random.key(5), **options))(prompt_BP))
    monkeypatch.setattr(sampler, "NOISE_AHEAD", 0)  # every draw inside the decode loop
    per_step = np.asarray(jax.jit(lambda p: generate(model, p, jax.random.key(5), **options))(prompt_BP))
    np.testing.assert_array_equal(ahead, per_step)


def test_sampling_key_is_a_pure_function_of_the_key_and_its_draws_compile_without_a_loop():
    data = lambda k: np.asarray(jax.random.key_data(sampling_key(k)))  # noqa: E731
    np.testing.assert_array_equal(data(jax.random.key(3)), data(jax.random.key(3)))
    assert not np.array_equal(data(jax.random.key(3)), data(jax.random.key(4)))
    np.testing.assert_array_equal(data(jax.random.PRNGKey(3)), data(jax.random.key(3)))  # raw keys too
    # The point of it (core/sampler.py): a decode step's draws lower without a rolled while loop.
    logits_BV = jnp.zeros((2, V))
    step = jax.jit(lambda k, i: pick(logits_BV, jax.random.fold_in(k, i), 1.0, 0, 1.0))
    assert "while" not in step.lower(sampling_key(jax.random.key(0)), 5).compile().as_text()
