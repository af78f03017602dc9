"""Interleaved A/B of the sampler's PRNG (core/sampler.py: SAMPLING_PRNG) on the CPU config.

`python benchmarks/sampler_prng.py [--rounds 10] [--batch 1] [impl ...]` prints, per PRNG impl,
the per-step decode time of 500 new tokens in every round (best of 3 calls each), then min and
median. Rounds alternate the impls so that this machine's drift hits them alike.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (sets up the path and huge pages first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from core import mesh as mesh_lib, sampler  # noqa: E402
from core.state import state_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("impls", nargs="*", default=["threefry2x32", sampler.SAMPLING_PRNG])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    cfg = bench.cfg_of("shakespeare_char_cpu")
    spec = state_spec(cfg, {"vocab_size": bench.VOCAB}, mesh_lib.make_mesh(cfg.mesh))
    state = jax.jit(spec.make_state)()
    prompt = jnp.zeros((args.batch, 1), jnp.int32)
    gens = {}
    for impl in args.impls:  # SAMPLING_PRNG is read when each function is traced, here
        sampler.SAMPLING_PRNG = impl
        gens[impl] = sampler.compile_generate(spec.graphdef, max_new_tokens=500, temperature=1.0, top_k=0, top_p=1.0)
        gens[impl](state["params"], state["rest"], prompt, jax.random.key(0)).block_until_ready()
    us = {impl: [] for impl in gens}
    for _ in range(args.rounds):
        for impl, gen in gens.items():
            call = lambda: gen(state["params"], state["rest"], prompt, jax.random.key(1)).block_until_ready()  # noqa: E731
            us[impl].append(1e6 * min(bench._timed(call) for _ in range(3)) / 500)
    for impl, v in us.items():
        print(f"{impl:14s} batch {args.batch}: " + " ".join(f"{x:.1f}" for x in v)
              + f"  min {min(v):.1f}  median {sorted(v)[len(v) // 2]:.1f} us per step")


if __name__ == "__main__":
    main()
