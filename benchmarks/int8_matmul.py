"""Which int8 matmuls XLA-CPU runs on int8 weights: `python benchmarks/int8_matmul.py [--rounds 5] [--threads 1]`.

The batch-1 decode step's 24 matrix-vector products of the GPU-recipe model (6 layers x qkv, proj, fc,
fc_proj, 384 wide: 42 MB of float32, 10.6 MB of int8), chained inside a lax.scan of STEPS steps as the
sampler's decode loop is, so loop-invariant weights are treated as XLA treats the model's. Per variant: us
per step (best of --rounds interleaved rounds) and the dtype the weights have inside the loop, read from
the optimized HLO (the while loop's operands): `s8` means the loop reads the int8 weights themselves.

- `float32`: x @ w, the float model.
- `dequant_f32` / `dequant_bf16`: x @ (q * s) in float32, or in bf16 at float32 accumulation. XLA hoists
  the int8 -> float convert out of the loop: the loop streams float32 weights again (a 1-row bf16 dot is
  upcast too).
- `int8_1row`: int8 x int8 -> int32 with one activation row: XLA upcasts both to int32.
- `int8_2rows`: the same with a second row: YNNPACK's int8 GEMM reads the int8 weights (model.quant=int8_dynamic).
- `int8_hi_lo`: model/quant.py's weight-only product: 16-bit activations as two int8 rows (model.quant=int8).
- `reduce_fused`: sum(x * q) in float32 behind an optimization barrier: one YNNPACK fusion reads int8 weights.
"""
import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.configure()  # as the mains do, before JAX is imported: core/runtime.py

D, N_LAYERS, STEPS = 384, 6, 200
SHAPES = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * N_LAYERS  # qkv, proj, fc, fc_proj per layer


def variants():
    """name -> matmul(x_1D, w, s): each variant's product of one activation row with one weight."""
    import jax
    import jax.numpy as jnp

    from model import quant

    f32, bf16 = jnp.float32, jnp.bfloat16
    dims = (((1,), (0,)), ((), ()))

    def int8_rows(x, q, s, rows):
        s_11 = jnp.max(jnp.abs(x)) / 127 + 1e-30
        x_RD = jnp.round(x / s_11).astype(jnp.int8)
        x_RD = jnp.concatenate([x_RD] + [jnp.zeros_like(x_RD)] * (rows - 1))
        return jax.lax.dot_general(x_RD, q, dims, preferred_element_type=jnp.int32)[:1].astype(f32) * s_11 * s

    def reduce_fused(x, q, s):
        x, q = jax.lax.optimization_barrier((x, q))  # else the convert is hoisted out of the loop as above
        return (x.reshape(-1, 1) * q.astype(f32)).sum(0, keepdims=True) * s

    return {
        "float32": lambda x, w, s: x @ w,
        "dequant_f32": lambda x, q, s: (x @ q.astype(f32)) * s,
        "dequant_bf16": lambda x, q, s: jnp.dot(x.astype(bf16), q.astype(bf16), preferred_element_type=f32) * s,
        "int8_1row": lambda x, q, s: int8_rows(x, q, s, 1),
        "int8_2rows": lambda x, q, s: int8_rows(x, q, s, 2),
        "int8_hi_lo": lambda x, q, s: quant.matmul(x, q, s, dynamic=False),
        "reduce_fused": reduce_fused,
    }


def probe(matmul, weights, scales):
    """(a call timing STEPS decode steps, the dtype of the first weight inside the compiled loop)."""
    import jax
    import jax.numpy as jnp

    def run(x_1D, ws, ss):
        def step(h_1D, _):
            for i in range(0, len(ws), 4):
                a = matmul(h_1D, ws[i], ss[i])[:, :D]  # qkv's 3D outputs feed a D-wide input: keep the first D
                b = matmul(a, ws[i + 1], ss[i + 1])
                c = jax.nn.gelu(matmul(b, ws[i + 2], ss[i + 2]))
                h_1D = h_1D + jnp.tanh(matmul(c, ws[i + 3], ss[i + 3]))
            return h_1D, None
        return jax.lax.scan(step, x_1D, None, length=STEPS)[0]

    x_1D = jnp.full((1, D), 0.1, jnp.float32)
    compiled = jax.jit(run).lower(x_1D, weights, scales).compile()
    loop = next(line for line in compiled.as_text().splitlines() if " while(" in line)
    n = weights[0].shape
    inside = next((t for t in ("s8", "bf16", "s32", "f32") if re.search(rf"\b{t}\[{n[0]},{n[1]}\]", loop)), "?")
    compiled(x_1D, weights, scales).block_until_ready()

    def timed():
        t = time.perf_counter()
        compiled(x_1D, weights, scales).block_until_ready()
        return (time.perf_counter() - t) / STEPS * 1e6

    return timed, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="XLA-CPU threads (0: one per core)")
    args = parser.parse_args()
    runtime.cpu_threads(args.threads)
    import jax.numpy as jnp
    import numpy as np

    from model import quant

    rng = np.random.default_rng(0)
    w_float = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in SHAPES]
    q_int8, scales = zip(*(quant.quantize(w, -2) for w in w_float))
    probes = {}
    for name, matmul in variants().items():
        probes[name] = probe(matmul, w_float if name == "float32" else list(q_int8), list(scales))
    best = {name: float("inf") for name in probes}
    for _ in range(args.rounds):
        for name, (timed, _) in probes.items():
            best[name] = min(best[name], timed())
    print(f"| matmul form | loop reads | us/step | vs float32 |  ({len(SHAPES)} matvecs, {STEPS} steps, "
          f"{runtime.cpu_thread_count()} XLA-CPU thread(s))")
    print("|---|---|---|---|")
    for name, us in best.items():
        print(f"| `{name}` | {probes[name][1]} | {us:.0f} | {best['float32'] / us:.2f}x |")


if __name__ == "__main__":
    main()
