"""Train a model: `python train.py [+experiment=NAME] [key=value ...]` (see configs/train.yaml).

`-m` sweeps (Hydra's basic launcher) run every job in this process, each in its own directory
under runs/sweeps/<name>/; a failing job is recorded there (FAILED) and the sweep goes on; the
exit status is the number of failed jobs.
"""
from core import xla_flags
from core.hugepages import use_huge_pages

if __name__ == "__main__":
    use_huge_pages()  # first, before jax allocates anything: core/hugepages.py
    xla_flags.apply()  # before JAX starts its backend: core/xla_flags.py

import os
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from core import cli, config
from core.errors import UserError

config.register()
FAILED_JOBS: list[str] = []


def _record_failure(out_dir: str, message: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "FAILED"), "w") as f:
        f.write(message)
    FAILED_JOBS.append(out_dir)
    print(f"job failed ({message.strip().splitlines()[-1]}); recorded in {out_dir}/FAILED", file=sys.stderr)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg) -> float | None:
    from core.loop import resolve_out_dir, run  # after Hydra parsed argv: `--help` and compose errors stay fast

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            return run(cfg)["val_loss"]
        except UserError as e:
            cli.fail(e)
    if cfg.out_dir is None:
        cfg.out_dir = HydraConfig.get().runtime.output_dir
    out_dir = resolve_out_dir(cfg)
    print(f"sweep job {HydraConfig.get().job.num}: {' '.join(HydraConfig.get().overrides.task)} -> {out_dir}",
          file=sys.stderr)
    if os.path.exists(os.path.join(out_dir, "FAILED")):
        os.remove(os.path.join(out_dir, "FAILED"))  # this attempt decides anew
    try:
        result = run(cfg)
    except UserError as e:
        _record_failure(out_dir, f"error: {e}\n")
    except Exception:  # noqa: BLE001 - one job's crash must not end the sweep
        _record_failure(out_dir, traceback.format_exc())
    else:
        if result["stopped_by"]:  # SIGTERM/Ctrl-C stops the whole sweep, not just this job
            print(f"sweep stopped by {result['stopped_by']}; rerun the same command to resume it", file=sys.stderr)
            sys.exit(0)
        return result["val_loss"]
    return float("nan")  # what sweepers such as Optuna read as a failed trial


if __name__ == "__main__":
    cli.preflight("train", sys.argv[1:])
    main()
    if FAILED_JOBS:
        print(f"{len(FAILED_JOBS)} sweep job(s) failed: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        sys.exit(min(len(FAILED_JOBS), 100))
