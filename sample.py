"""Sample from a language-model run (transformer or RNN): `python sample.py out_dir=runs/NAME [...]`.

The same sampler (core/sampler.py) drives both: the transformer's KV cache and the RNN's recurrent
carry are each the model's `cache`; the prompt is consumed first, then one token per step of a jitted
loop whose length is data, so 1 and 5,000 new tokens compile the same program.

Only the samples go to stdout, separated by lines `---`; logs go to stderr.
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import os
import sys

import hydra

from core import cli, config
from errors import UserError

config.register()


def check(cfg) -> None:
    if not cfg.out_dir:
        raise UserError("pass out_dir=DIR, the directory of a training run (e.g. out_dir=runs/shakespeare_char_cpu)")
    if not 0 <= cfg.temperature < float("inf"):  # NaN too: it would pick token 0 every time
        raise UserError(f"temperature={cfg.temperature} must be a finite number >= 0 (0 is greedy)")
    if cfg.top_k < 0:
        raise UserError(f"top_k={cfg.top_k} must be >= 0 (0 disables it)")
    if not 0.0 < cfg.top_p <= 1.0:
        raise UserError(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.num_samples <= 0 or cfg.max_new_tokens <= 0:
        raise UserError("num_samples and max_new_tokens must be positive")
    if not cfg.prompt:
        raise UserError("prompt must not be empty (the default is a newline)")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 0:
        raise UserError(f"cpu_threads={cfg.cpu_threads} must be >= 0 (0 is one per core; leave it unset to choose by "
                        f"model size)")


def cpu_threads(cfg) -> int:
    """XLA-CPU threads for this run: cfg.cpu_threads, else by the model's size (core/sampler.py).

    Decided before JAX starts its backend, so from the checkpoint's meta file and the model's shapes.
    """
    if cfg.cpu_threads is not None:
        return cfg.cpu_threads
    from core.checkpoint import peek_meta
    from core.sampler import cpu_threads_for
    from core.state import model_bytes, run_dims, saved_config

    meta = peek_meta(os.path.expanduser(cfg.out_dir), cfg.step)
    if meta is None:
        return 0
    try:
        return cpu_threads_for(model_bytes(saved_config(meta["config"]), run_dims(meta)))
    except Exception:  # noqa: BLE001 - a hint only: a meta load_run will reject with its own clear error
        return 0


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg) -> None:
    try:
        check(cfg)
        runtime.cpu_threads(cpu_threads(cfg))  # before JAX starts its backend (load_run starts it)
        runtime.compile_cache(cfg.compile_cache)
        import jax
        import numpy as np
        from flax import nnx

        from core.sampler import compile_generate
        from core.state import load_run

        run = load_run(cfg.out_dir, cfg.step)
        if run.task != "lm":
            raise UserError(f"{cfg.out_dir} holds a model={run.cfg.model.family} run trained for task={run.task}, "
                            f"which does not generate text; sample from a language-model run (task=lm)")
        codec = run.codec
        prompt_P = codec.encode(cfg.prompt)
        if len(prompt_P) == 0:
            raise UserError(f"prompt={cfg.prompt!r} encodes to no tokens; pass some text")
        n = max(runtime.cpu_thread_count(), jax.local_device_count())  # XLA: at least a thread per device
        threads = f" (XLA-CPU on {n} thread{'s' * (n > 1)})" if jax.default_backend() == "cpu" else ""
        print(f"sampling from step {run.step} of {cfg.out_dir}{threads}", file=sys.stderr)
        generate = compile_generate(nnx.graphdef(run.model), max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        prompt_BP = np.broadcast_to(prompt_P, (cfg.num_samples, len(prompt_P)))
        tokens_BN = jax.device_get(generate(run.state["params"], run.state["rest"], prompt_BP,
                                            jax.random.key(cfg.seed)))
        samples = [cfg.prompt + codec.decode(row) for row in tokens_BN]
        sys.stdout.write("\n---\n".join(samples) + "\n")
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("sample", sys.argv[1:])
    main()
