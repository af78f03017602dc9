"""Quantize a trained run to int8: `python compress.py out_dir=RUN method=int8 dest=DIR [embeddings=true]`.

Writes DIR, a new run directory whose dense weights are int8 with per-output-channel scales
(model/quant.py): sample.py, serve.py, export.py and `load_run` read it as any run. method=int8 quantizes
the weights only; int8_dynamic the activations too (per token). embeddings=true quantizes the token
embedding (a transformer's output head too). DIR/compression.json holds the validation metrics, weight
bytes and speed before and after. Options: step=N (default: the latest checkpoint), overwrite=true
(replace an earlier compressed run at dest), cpu_threads=N (for the speed figures), data_path=FILE
(evaluate on this copy of the training data when the run's has moved). The run is written
beside dest and renamed onto it only once complete.
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import sys

import hydra

from core import cli, config
from errors import UserError

config.register()


def check(cfg) -> None:
    from model.quant import METHODS

    if not cfg.out_dir:
        raise UserError("pass out_dir=DIR, the directory of a trained run (e.g. out_dir=runs/shakespeare_char_cpu)")
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method} is not one of {', '.join(METHODS)}")
    if not cfg.dest:
        raise UserError("pass dest=DIR, the directory to write the compressed run to")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 0:
        raise UserError(f"cpu_threads={cfg.cpu_threads} must be >= 0 (0 is one per core)")


@hydra.main(config_path="configs", config_name="compress", version_base="1.3")
def main(cfg) -> None:
    try:
        check(cfg)
        from core import compress

        threads = cfg.cpu_threads if cfg.cpu_threads is not None else compress.cpu_threads(cfg.out_dir, cfg.step)
        runtime.cpu_threads(threads)  # before JAX starts its backend (load_run starts it)
        runtime.compile_cache(cfg.compile_cache)
        r = compress.run(cfg)
        unit = next(k for k in r if k.endswith("_per_s_before")).removesuffix("_per_s_before")
        print(f"wrote step {r['step']} of {r['source']} as {cfg.method} to {cfg.dest}: val_loss "
              f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}, weights {r['bytes_before']:,} -> "
              f"{r['bytes_after']:,} bytes ({r['bytes_ratio']:.3f}x), {r[f'{unit}_per_s_before']:,.0f} -> "
              f"{r[f'{unit}_per_s_after']:,.0f} {unit}/s ({r['speedup']:.2f}x)", file=sys.stderr)
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("compress", sys.argv[1:])
    main()
