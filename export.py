"""Export a run for use without this code: `python export.py out_dir=RUN format=stablehlo|savedmodel dest=DIR`.

stablehlo: model.jaxexport (jax.export's serialized StableHLO), params.npz and signature.json; reloaded
with jax and numpy alone. savedmodel: a TF SavedModel (through jax2tf) for TF Serving, plus
signature.json. Language models get a decode step with its cache as well. Options: step=N (default:
the latest checkpoint), batch=N (default: a symbolic batch), overwrite=true (replace an earlier export),
platforms=[cpu,cuda,tpu]. The export is written beside dest and renamed onto it only once complete.
docs/export.md describes the files.
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
    from core.export import FORMATS, PLATFORMS

    if not cfg.out_dir:
        raise UserError("pass out_dir=DIR, the directory of a training run (e.g. out_dir=runs/shakespeare_char_cpu)")
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    if not cfg.dest:
        raise UserError("pass dest=DIR, the directory to write the export to")
    if cfg.batch is not None and cfg.batch <= 0:
        raise UserError(f"batch={cfg.batch} must be positive (leave it unset for a symbolic batch)")
    unknown = [p for p in cfg.platforms if p not in PLATFORMS]
    if unknown or not cfg.platforms:
        raise UserError(f"platforms={list(cfg.platforms)} must list some of {', '.join(PLATFORMS)}")


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg) -> None:
    try:
        check(cfg)
        from core import export
        from core.state import load_run

        dest = export.check_dest(cfg.dest, cfg.overwrite)
        run = load_run(cfg.out_dir, cfg.step)
        progs = export.save(run, cfg.out_dir, dest, cfg.format, cfg.batch, cfg.platforms)
        print(f"wrote step {run.step} of {cfg.out_dir} ({run.cfg.model.family}, task={run.task}) to {dest}: "
              f"{' and '.join(p.name for p in progs)} as {cfg.format}, for {', '.join(cfg.platforms)}", file=sys.stderr)
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("export", sys.argv[1:])
    main()
