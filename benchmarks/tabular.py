"""Train-step speed of +experiment=california_mlp: `python benchmarks/tabular.py [--steps 400] [--repeats 3]`.

Random rows of the experiment's shape (8 features, 1 target; no file needed) through the jitted
step as the loop runs it: one step per dispatch (the config's), and 10 per dispatch (steps_per_call=10).
Prints rows/s (best of the repeats) per setting; speed is reported here, never asserted in tests.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.configure()  # measure what train.py runs: core/runtime.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from core import config  # noqa: E402
from core.state import setup  # noqa: E402
from tasks import regress  # noqa: E402

config.register()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = {"in_features": 8, "out_features": 1}


def rows_per_s(cfg, steps: int, per_call: int, repeats: int) -> float:
    """Best-of-`repeats` training rows per second over `steps` steps, `per_call` steps per dispatch."""
    built = setup(cfg, DIMS, regress.loss)
    rng = np.random.default_rng(0)
    B = cfg.batch_size
    rows = [{"x": rng.standard_normal((B, 8), np.float32), "y": rng.standard_normal((B, 1), np.float32)}
            for _ in range(per_call)]
    batch = built.runner.batch(rows[0]) if per_call == 1 else built.runner.stack(rows)
    train = built.runner.train if per_call == 1 else built.runner.train_many
    state = built.fresh_state()
    state, m = train(state, batch)  # compile
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps // per_call):
            state, m = train(state, batch)
        jax.block_until_ready((state, m))
        best = min(best, time.perf_counter() - t0)
    return steps // per_call * per_call * B / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=california_mlp", "mesh.data=1"])
    print(f"california_mlp train step: batch {cfg.batch_size}, hidden {list(cfg.model.hidden)}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), {args.steps} steps, best of {args.repeats}")
    for per_call in (1, 10):
        rate = rows_per_s(cfg, args.steps, per_call, args.repeats)
        print(f"  steps_per_call={per_call:<3} {rate:>10,.0f} rows/s  {cfg.batch_size / rate * 1e3:.3f} ms/step")


if __name__ == "__main__":
    main()
