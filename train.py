"""Train a model: `python train.py [+experiment=NAME] [key=value ...]` (see configs/train.yaml).

A run's directory defaults to runs/<name>, plus the overrides that name it (core/config.py
RESUME_SAFE), so rerunning a command resumes it and a different command is a different run.
`-m` sweeps (Hydra's basic launcher) run every job in this process, each in its own directory
under runs/sweeps/<name>/; a failing job is recorded there (FAILED), a job another process holds
is skipped, and the sweep goes on; the exit status is the number of failed and skipped jobs (at most 100).
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import contextlib
import hashlib
import os
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from core import cli, config
from errors import UserError

config.register()
FAILED_JOBS: list[str] = []
SKIPPED_JOBS: list[str] = []


def _record_failure(cfg, out_dir: str, message: str) -> None:
    from core.distributed import writes_job_files

    where = f"recorded in {out_dir}/FAILED"
    if writes_job_files(cfg.distributed):  # process 0, as for everything else in the run's directory
        try:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "FAILED"), "w") as f:
                f.write(message)
        except OSError as e:  # an unwritable out_dir may be why the job failed: the sweep goes on
            where = f"not recorded: {out_dir} is not writable ({e.strerror})"
    FAILED_JOBS.append(out_dir)
    print(f"job failed ({message.strip().splitlines()[-1]}); {where}", file=sys.stderr)


def default_out_dir(cfg) -> str:
    """runs/<name>, then `,` and the overrides that name the run (as sweep job directories are named).

    A run started from (or distilled from) another one is named by that run's directory name too, so
    it never lands in its source's directory or its undistilled twin's.
    """
    named = _overrides_named(HydraConfig.get().job.override_dirname)
    for key in ("init_from", "distill.teacher", "data.tokenizer_from"):  # paths: named by the directory's name
        paths = OmegaConf.select(cfg, key)
        paths = list(paths) if OmegaConf.is_list(paths) else [paths] if paths else []  # teachers: a list
        if paths:
            named.append(f"{key}=" + "+".join(os.path.basename(os.path.normpath(str(p))) for p in paths))
    return os.path.join("runs", ",".join([cfg.name, *filter(None, named)]))


def _overrides_named(override_dirname: str, swept: dict | None = None) -> list[str]:
    """Hydra's `key=value,...` with each path value by its basename (never nested folders), as `_named` says."""
    return [_named(k, v, (swept or {}).get(k, ())) for item in override_dirname.split(",") if item
            for k, _, v in [item.partition("=")]]


def _named(key: str, value, others=()) -> str:
    """`key=value` for a directory name: a path by its basename, plus a short hash of the path where another
    value of the key has the same basename (a sweep over a/train.txt and b/train.txt)."""
    value = str(value)
    if "/" not in value:
        return f"{key}={value}"
    base = os.path.basename(os.path.normpath(value))
    clash = any(o != value and os.path.basename(os.path.normpath(o)) == base for o in others)
    return f"{key}={base}" + (f"-{hashlib.sha1(os.path.abspath(value).encode()).hexdigest()[:6]}" if clash else "")


def sweep_job_dir() -> str:
    """The job's directory: Hydra's (named by the overrides that name runs), plus each swept key that names
    no run (a path: its basename), or jobs that differ only in those would share one directory."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    try:
        parser = OverridesParser.create()
        swept = {o.key_or_group: [str(v) for v in o.sweep_string_iterator()]
                 for o in parser.parse_overrides(get_args_parser().parse_args(sys.argv[1:]).overrides)
                 if o.is_sweep_override()}
        mine = {o.key_or_group: o.value() for o in parser.parse_overrides(list(hc.overrides.task))}
    except Exception:  # noqa: BLE001 - a search space (Optuna's interval) has no values to list: Hydra's name
        return hc.runtime.output_dir
    named = _overrides_named(hc.job.override_dirname, swept)
    extra = [_named(k, v, swept[k]) for k, v in sorted(mine.items()) if k in swept and k in config.UNNAMED_KEYS]
    name = ",".join(named + extra)
    if name == hc.job.override_dirname:
        return hc.runtime.output_dir
    try:
        os.rmdir(hc.runtime.output_dir)  # the shared directory Hydra made for the job, if empty
    except OSError:
        pass
    return os.path.join(hc.sweep.dir, name)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg) -> float | None:
    from core import preempt
    from core.compress import refuse_training
    from core.distributed import writes_job_files
    from core.loop import resolve_out_dir, run  # after Hydra parsed argv: `--help` and compose errors stay fast
    from core.runlock import RunLocked

    runtime.compile_cache(cfg.compile_cache)
    preempt.IGNORE_AFTER_STOP = True  # this process ends after a stop (core/preempt.py)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        if cfg.out_dir is None:
            cfg.out_dir = default_out_dir(cfg)
        try:
            refuse_training(resolve_out_dir(cfg))
            return run(cfg)["val_loss"]
        except UserError as e:
            cli.fail(e)
    if cfg.out_dir is None:
        cfg.out_dir = sweep_job_dir()
    out_dir = resolve_out_dir(cfg)
    print(f"sweep job {HydraConfig.get().job.num}: {' '.join(HydraConfig.get().overrides.task)} -> {out_dir}",
          file=sys.stderr)
    try:
        if writes_job_files(cfg.distributed):  # a lagging process must not remove what process 0 wrote
            with contextlib.suppress(OSError):  # unremovable: the job goes on like the other processes
                os.remove(os.path.join(out_dir, "FAILED"))  # this attempt decides anew
        result = run(cfg)
    except RunLocked as e:  # another process is running this job: leave its directory alone
        SKIPPED_JOBS.append(out_dir)
        print(f"job skipped: {e}", file=sys.stderr)
    except UserError as e:
        _record_failure(cfg, out_dir, f"error: {e}\n")
    except Exception:  # noqa: BLE001 - one job's crash must not end the sweep
        _record_failure(cfg, out_dir, traceback.format_exc())
    else:
        if result["stopped_by"]:  # SIGTERM/Ctrl-C stops the whole sweep, not just this job
            print(f"sweep stopped by {result['stopped_by']}; rerun the same command to resume it", file=sys.stderr)
            cli.exit_now(min(len(FAILED_JOBS) + len(SKIPPED_JOBS), 100))
        return result["val_loss"]
    return float("nan")  # what sweepers such as Optuna read as a failed trial


if __name__ == "__main__":
    cli.preflight("train", sys.argv[1:])
    main()
    if FAILED_JOBS or SKIPPED_JOBS:
        if FAILED_JOBS:
            print(f"{len(FAILED_JOBS)} sweep job(s) failed: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        if SKIPPED_JOBS:
            print(f"{len(SKIPPED_JOBS)} sweep job(s) skipped, held by another process: {', '.join(SKIPPED_JOBS)}",
                  file=sys.stderr)
        # At once: a failed TFDS download leaves non-daemon threads that a normal exit would wait for.
        cli.exit_now(min(len(FAILED_JOBS) + len(SKIPPED_JOBS), 100))
