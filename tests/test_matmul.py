"""Mixed-precision dense matmuls (model.matmul_dtype=bfloat16|auto): the math, the lowering, the switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, compose
from core.config import check
from errors import UserError
from model import build
from model import matmul
from model.matmul import bf16_matmul


def _bf16(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("T", [12, 7])  # even T takes the reshape-transpose path, odd T the plain one
def test_bf16_matmul_and_its_gradients_are_bf16_rounded_products_accumulated_in_float32(T):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x_TD, w_DF, g_TF = (jax.random.normal(k, s) for k, s in ((kx, (T, 24)), (kw, (24, 40)), (kg, (T, 40))))
    y_TF, vjp = jax.vjp(jax.jit(bf16_matmul), x_TD, w_DF)
    dx_TD, dw_DF = vjp(g_TF)
    assert y_TF.dtype == dx_TD.dtype == dw_DF.dtype == jnp.float32
    x, w, g = _bf16(x_TD), _bf16(w_DF), _bf16(g_TF)
    np.testing.assert_allclose(y_TF, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_TD, g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw_DF, x.T @ g, rtol=1e-5, atol=1e-5)
    # ...and not the float32 products: the rounding is really there.
    assert np.abs(np.asarray(dw_DF) - np.asarray(x_TD).T @ np.asarray(g_TF)).max() > 1e-4


def test_bf16_gradient_dots_compile_to_bf16_not_upcast_float32():
    """XLA-CPU upcasts a bf16 dot it cannot give YNNPACK (e.g. a transposed left operand) to float32."""
    def loss(x_TD, w_DF):
        return bf16_matmul(x_TD, w_DF).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
    computations = hlo.split("\n%")  # each starts with its header: name (param: type, ...) -> type {
    with_dots = [c for c in computations if " dot(" in c]
    assert len(with_dots) == 2  # the input and the weight gradient (the forward's value is unused)
    for c in with_dots:
        params = c.split(") -> ")[0]
        assert params.count("bf16[") == 2 and "f32[" not in params, f"a gradient dot runs in float32:\n%{c}"


def test_matmul_dtype_switch_keeps_the_params_and_the_logits():
    """Same params either way (switchable between resumes); logits agree to bf16 rounding."""
    cfg32 = compose(TINY + ["model.dropout=0.0"])
    cfg16 = compose(TINY + ["model.dropout=0.0", "model.matmul_dtype=bfloat16"])
    m32 = build(cfg32.model, {"vocab_size": 13}, rngs=nnx.Rngs(0))
    m16 = build(cfg16.model, {"vocab_size": 13}, rngs=nnx.Rngs(0))
    s32, s16 = nnx.state(m32, nnx.Param), nnx.state(m16, nnx.Param)
    assert jax.tree.structure(s32) == jax.tree.structure(s16)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s32), jax.tree.leaves(s16)))
    idx_BL = jax.random.randint(jax.random.key(1), (2, 8), 0, 13)
    l32, l16 = np.asarray(m32(idx_BL)), np.asarray(m16(idx_BL))
    assert not np.array_equal(l32, l16)
    np.testing.assert_allclose(l16, l32, atol=2e-2)


def test_matmul_dtype_can_change_between_resumes_and_old_checkpoint_configs_load():
    """Checkpoints saved before the key existed rebuild as float32; switching it on resume is allowed."""
    from omegaconf import OmegaConf

    from core.config import diff
    cfg = compose(TINY)
    saved = OmegaConf.to_container(cfg)
    del saved["model"]["matmul_dtype"]
    model = build(OmegaConf.create(saved).model, {"vocab_size": 13}, rngs=nnx.Rngs(0))
    from model.matmul import flat_dot_general
    assert model.blocks.mlp.fc.dot_general is flat_dot_general
    current = OmegaConf.to_container(compose(TINY + ["model.matmul_dtype=bfloat16"]))
    assert diff(saved, current) == ([], ["model.matmul_dtype"])


def test_unknown_matmul_dtype_is_a_user_error():
    with pytest.raises(UserError, match="model.matmul_dtype=float8 must be float32, bfloat16 or auto"):
        check(compose(TINY + ["model.matmul_dtype=float8"]))


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True),   # Cooper Lake and later Xeons
    ("fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx2 fma", False),                            # an AVX2-only EPYC: bf16 dots run slower
    (None, False),                                           # no /proc/cpuinfo (macOS)
])
def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path, flags, expected):
    path = tmp_path / "cpuinfo"
    if flags is not None:
        path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert matmul._cpu_has_bf16_matmul(str(path)) is expected


@pytest.mark.parametrize("backend, cpu_bf16, expected", [
    ("cpu", False, "float32"), ("cpu", True, "bfloat16"), ("gpu", False, "bfloat16"), ("tpu", False, "bfloat16")])
def test_auto_is_bf16_where_it_is_the_faster(monkeypatch, backend, cpu_bf16, expected):
    monkeypatch.setattr(matmul.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(matmul, "_cpu_has_bf16_matmul", lambda: cpu_bf16)
    assert matmul.resolve("auto") == expected
    assert matmul.resolve("float32") == "float32" and matmul.resolve("bfloat16") == "bfloat16"


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_auto_model_computes_exactly_what_its_choice_does(monkeypatch, cpu_bf16):
    """Same params as either choice; the logits are those of the dtype it resolves to, bit for bit."""
    monkeypatch.setattr(matmul, "_cpu_has_bf16_matmul", lambda: cpu_bf16)
    chosen = "bfloat16" if cpu_bf16 else "float32"
    models = {d: build(compose(TINY + ["model.dropout=0.0", f"model.matmul_dtype={d}"]).model, {"vocab_size": 13},
                       rngs=nnx.Rngs(0)) for d in ("auto", "float32", "bfloat16")}
    idx_BL = jax.random.randint(jax.random.key(1), (2, 8), 0, 13)
    logits = {d: np.asarray(m(idx_BL)) for d, m in models.items()}
    assert np.array_equal(logits["auto"], logits[chosen])
    assert not np.array_equal(logits["float32"], logits["bfloat16"])  # the two choices differ: the test can tell
