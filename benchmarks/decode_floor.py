"""Where the batch-1 sampler's floor is on this machine: `python benchmarks/decode_floor.py [--rounds 5]`.

A batch-1 decode step is 16 matrix-vector products over the CPU config's weights (4 layers x qkv, proj,
fc, fc_proj) plus attention, norms and the draw; past the context, every T/2 tokens also re-prefill
T/2 tokens (core/sampler.py). Measured here, best of `--rounds` interleaved rounds:
- `matvecs`: the step's 16 matvecs alone, chained as in the model, on its distinct float32 weights
  (~3.1 MB, more than a core's L2 here) -- XLA-CPU has no bf16 matrix-vector kernel (a 1-row bf16 dot
  is upcast), so this is the floor of any batch-1 step at this model size;
- `matvecs_one_layer`: the same 16 matvecs cycling over one layer's weights (~0.8 MB, L2-resident):
  what the step's matvecs would cost if its weights fit in cache;
- `matvecs_2rows`: the 16 matvecs at 2 rows, the price of decoding a second stream alongside;
- `call_1`, `decode_one_window`, `decode_500`: the sampler itself, 1, 63 and 500 new tokens after a
  1-token prompt (per call, us): a token's decode is (63 - 1 tokens' difference) / 62, the slides'
  share of a token over 500 what the 500-token call spends beyond its call overhead and decodes;
- `prefill_half`: a T/2-token prefill alone (each slide's work; standalone it also casts the weights to bf16).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.configure()  # as the mains do, before JAX is imported: core/runtime.py

import run as bench  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


STEPS = 1000  # matvec chains per timed call


def chain_us(weights, rows: int):
    """us per chain of x @ w over `weights` in order, each output cut to the next one's input width."""
    def chain(x, ws):
        def body(h, _):
            for w in ws:
                h = (h[:, :w.shape[0]] @ w) * 1e-3  # qkv's 3D outputs feed a D-wide input: keep the first D
            return h, None
        return jax.lax.scan(body, x, None, length=STEPS)[0]

    fn = jax.jit(chain)
    x = jnp.ones((rows, weights[0].shape[0]), jnp.float32)
    fn(x, weights).block_until_ready()
    return lambda: 1e6 * bench._timed(lambda: fn(x, weights).block_until_ready()) / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = bench.cfg_of("shakespeare_char_cpu")
    spec, state = bench.lm_state(cfg)
    model = nnx.merge(spec.graphdef, state["params"], state["rest"])
    blocks = model.blocks
    dense = (blocks.attn.qkv, blocks.attn.proj, blocks.mlp.fc, blocks.mlp.proj)
    names = ("qkv", "attn_proj", "fc", "fc_proj")
    weights = [d.kernel[...][i] for i in range(cfg.model.n_layers) for d in dense]
    one_layer = weights[:len(names)] * cfg.model.n_layers
    T = cfg.data.seq_len

    def sampler_us(n):  # us per call
        call = bench.generate_call(spec, state, 1, n)
        return lambda: 1e6 * min(bench._timed(call) for _ in range(3))

    dec = model.decoder()
    prefill = jax.jit(lambda idx: dec(idx, cache=model.init_cache(1), pos=0)[0])
    half = jnp.zeros((1, T // 2), jnp.int32)
    prefill(half).block_until_ready()
    probes = {
        "matvecs": chain_us(weights, 1),
        "matvecs_one_layer": chain_us(one_layer, 1),
        "matvecs_2rows": chain_us(weights, 2),
        "call_1": sampler_us(1),
        "decode_one_window": sampler_us(T - 1),
        "decode_500": sampler_us(500),
        "prefill_half": lambda: 1e6 * min(bench._timed(lambda: prefill(half).block_until_ready()) for _ in range(5)),
    }
    best = {name: float("inf") for name in probes}
    for _ in range(args.rounds):
        for name, probe in probes.items():
            best[name] = min(best[name], probe())
    mb = sum(w.size for w in weights) * 4 / 2**20
    print(f"the step's 16 matvecs: {best['matvecs']:.1f} us/token over {mb:.1f} MiB of float32 weights; "
          f"{best['matvecs_one_layer']:.1f} us cycling one layer's (L2-resident); {best['matvecs_2rows']:.1f} us at 2 rows")
    decode = (best["decode_one_window"] - best["call_1"]) / (T - 2)  # one more token, one more step
    slide = (best["decode_500"] - best["call_1"]) / 499 - decode  # the slides' share of each token over 500
    rest = decode - best["matvecs"]
    print(f"sampler, batch 1: a call for 1 new token {best['call_1']:.0f} us, for {T - 1} {best['decode_one_window']:.0f} us "
          f"({T - 1} / that = {(T - 1) / best['decode_one_window'] * 1e6:.0f} tokens/s), for 500 {best['decode_500']:.0f} us "
          f"({500 / best['decode_500'] * 1e6:.0f} tokens/s); a {T // 2}-token prefill alone {best['prefill_half']:.0f} us")
    print(f"per token over 500: {decode:.1f} us decoding = {best['matvecs']:.1f} matvecs + {rest:.1f} the rest "
          f"(attention, norms, draw, loop), + {slide:.1f} us of slides; with the rest free: "
          f"{1e6 / (best['matvecs'] + slide):.0f} tokens/s, without slides {1e6 / decode:.0f}")


if __name__ == "__main__":
    main()
