"""Mixed-precision dense matmuls: operands rounded to bfloat16, products accumulated in float32.

`model.matmul_dtype=bfloat16` routes a model's dense layers through `bf16_dot_general` (an
`nnx.Linear(dot_general=...)`), the bf16 autocast of PyTorch and of nanoGPT's GPU runs: params,
optimizer state, activations between layers, norms, softmax and loss stay float32; the three matmuls
of each dense layer (forward, input gradient, weight gradient) read bf16 operands and return float32.
The layer's saved input is kept in bf16 (half the activation memory).

Why a custom VJP: JAX's own transpose of a bf16 x bf16 -> f32 dot multiplies the float32 cotangent
by the bf16 operand, which XLA runs as a float32 dot. Here the cotangent is rounded to bf16 too.

On a CPU with AVX-512-BF16, XLA-CPU's YNNPACK dots run bf16 faster than float32 (benchmarks/), but only in
the layouts it supports: the left operand contracted on its last dimension (see `_rows_last`). On a CPU
without bf16 instructions (AVX2 only) the same step runs about 25% slower than in float32, so
`model.matmul_dtype=auto` picks bf16 only where it is the faster.
"""
import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _rows_last(x_TD):
    """x_TD as (D, T) in memory, for the weight gradient x^T @ g.

    A plain transpose is folded into the dot's dimension numbers; XLA-CPU then hands the dot to Eigen,
    which has no bf16 kernel, and upcasts it to float32. Through a reshape the
    transpose is materialised and the dot stays in YNNPACK's bf16 kernel. Rows are split (T/2, 2) so a
    data-parallel sharding of T stays local to each device.
    """
    T, D = x_TD.shape
    if T % 2:
        return x_TD.T
    return x_TD.reshape(T // 2, 2, D).transpose(2, 0, 1).reshape(D, T)


@jax.custom_vjp
def bf16_matmul(x_TD, w_DF):
    """(T, D) @ (D, F) -> float32 (T, F), both operands rounded to bfloat16."""
    return _fwd(x_TD, w_DF)[0]


def _fwd(x_TD, w_DF):
    xb_TD, wb_DF = x_TD.astype(jnp.bfloat16), w_DF.astype(jnp.bfloat16)
    y_TF = jnp.einsum("TD,DF->TF", xb_TD, wb_DF, preferred_element_type=F32)
    return y_TF, (xb_TD, wb_DF, jnp.zeros((), x_TD.dtype), jnp.zeros((), w_DF.dtype))


def _bwd(res, g_TF):
    xb_TD, wb_DF, x_like, w_like = res
    gb_TF = g_TF.astype(jnp.bfloat16)
    dx_TD = jnp.einsum("TF,DF->TD", gb_TF, wb_DF, preferred_element_type=F32)
    dw_DF = jnp.einsum("DT,TF->DF", _rows_last(xb_TD), gb_TF, preferred_element_type=F32)
    return dx_TD.astype(x_like.dtype), dw_DF.astype(w_like.dtype)


bf16_matmul.defvjp(_fwd, _bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`nnx.Linear`'s dot_general hook: inputs (..., D) @ kernel (D, F) through `bf16_matmul`."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2 or any(batch):
        raise NotImplementedError(f"bf16_dot_general handles x @ kernel only, not {dimension_numbers}")
    y_TF = bf16_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y_TF.reshape(*lhs.shape[:-1], rhs.shape[1]).astype(preferred_element_type or lhs.dtype)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`nnx.Linear`'s dot_general hook in float32: (..., D) @ (D, F) as one 2-D matmul.

    XLA-CPU runs 2-D dots and their gradients faster than the same product with batch dims.
    """
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2 or any(batch):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    y_TF = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)
    return y_TF.reshape(*lhs.shape[:-1], rhs.shape[1])


@functools.cache
def _cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU has the bf16 dot instructions XLA-CPU's kernels use (AVX512-BF16 or AMX-BF16).

    Elsewhere (ARM, macOS, an unreadable /proc) False: float32, the choice that is never much slower.
    """
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve(matmul_dtype: str) -> str:
    """float32 or bfloat16: `auto` is bfloat16 on accelerators and on CPUs with bf16 instructions.

    Starts JAX's backend: call it when tracing, never when building a model (see cpu_attention).
    """
    if matmul_dtype != "auto":
        return matmul_dtype
    return "bfloat16" if jax.default_backend() != "cpu" or _cpu_has_bf16_matmul() else "float32"


def auto_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`model.matmul_dtype=auto`: bf16_dot_general or flat_dot_general, whichever this machine runs faster."""
    chosen = DOT_GENERAL[resolve("auto")]
    return chosen(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type)


DOT_GENERAL = {"float32": flat_dot_general, "bfloat16": bf16_dot_general, "auto": auto_dot_general}
