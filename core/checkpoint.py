"""Self-describing Orbax checkpoints: the train state plus a JSON `meta` item (resolved config, vocab).

`sample.py` and any reload script need only the run directory. Restores go through an abstract
target that carries the *current* shardings, so a checkpoint moves between device counts.
"""
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp

from errors import UserError, first_line

def ckpt_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def has_checkpoints(out_dir: str) -> bool:
    """Whether out_dir holds any checkpoint step (complete or not), read from the directory alone."""
    root = ckpt_dir(out_dir)
    return os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))


def manager(out_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """An async CheckpointManager over out_dir/checkpoints; half-written (tmp) steps are cleaned up."""
    # Orbax's own read_only mode logs a warning on every open; not creating or cleaning is enough.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=not read_only)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(ckpt_dir(out_dir), options=options, item_handlers=handlers)


def _disk_error(mngr, e: Exception) -> UserError:
    reason = "No space left on device" if "No space left on device" in str(e) else first_line(e)
    return UserError(f"writing a checkpoint to {mngr.directory} failed ({reason}); free disk space or fix "
                     f"permissions, then rerun to resume from the last complete checkpoint")


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Start an async save; the device-to-host copy completes before this returns, so donation is safe.

    A failure of the previous async save surfaces here (or in `wait`) as a UserError.
    """
    try:
        with _quiet_loggers("absl", "asyncio"):
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
    except Exception as e:  # noqa: BLE001 - disk full, permissions, vanished directory...
        raise _disk_error(mngr, e) from None


def wait(mngr: ocp.CheckpointManager) -> None:
    """Block until pending saves are committed; a failed one is an error, not a lost log line."""
    try:
        with _quiet_loggers("absl", "asyncio"):
            mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _disk_error(mngr, e) from None


def close(mngr: ocp.CheckpointManager) -> None:
    """Wait for pending saves, then release the manager's threads; a failed save is one UserError."""
    try:
        wait(mngr)
    finally:
        with _quiet_loggers("absl", "asyncio"), contextlib.suppress(Exception):
            mngr.close()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def first_readable_meta(mngr: ocp.CheckpointManager, steps: list[int], where: str):
    """(step, meta) of the first of `steps` whose meta reads, warning of each damaged one; None if none reads.
    For what must build its restore target from a meta (its config) before any state is read."""
    for s in steps:
        try:
            return s, read_meta(mngr, s)
        except Exception as e:  # noqa: BLE001 - a damaged file surfaces as many error types
            print(f"warning: checkpoint step {s} in {where} is unreadable ({type(e).__name__}: "
                  f"{first_line(e, 160)}); falling back to an earlier one", file=sys.stderr)
    return None


def peek_meta(out_dir: str, step: int | None = None) -> dict | None:
    """The meta of the newest checkpoint (or of `step`), read from its file without Orbax or a JAX backend.

    For what must be decided before JAX starts (sample.py's thread count). A hint only: None where it
    cannot be read (another file layout, a remote path), and `load_run` then says what is wrong.
    """
    found = peek_step_meta(out_dir, step)
    return None if found is None else found[1]


def steps_on_disk(out_dir: str) -> list[int]:
    """The steps of out_dir's checkpoint directories, newest first ([] where none can be listed)."""
    try:
        return sorted((int(d) for d in os.listdir(ckpt_dir(out_dir)) if d.isascii() and d.isdigit()), reverse=True)
    except OSError:
        return []


def peek_step_meta(out_dir: str, step: int | None = None) -> tuple[int, dict] | None:
    """(step, meta) of the newest checkpoint whose meta file reads (or of `step`); None where none does."""
    root = ckpt_dir(out_dir)
    for s in [step] if step is not None else steps_on_disk(out_dir):
        try:
            with open(os.path.join(root, str(s), "meta", "metadata")) as f:
                return s, json.load(f)
        except (OSError, ValueError):
            continue
    return None


class _DropOrbaxErrors(logging.Filter):
    """Orbax's writer threads log each failed array; the failure reaches the user once, as a UserError."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@contextlib.contextmanager
def quiet_async_failures():
    """While a run's manager lives: a failed async save is reported once (by `save`/`wait`), not as pages.

    When a save fails (a full disk), Orbax closes its event loop while TensorStore's writer threads
    still hold callbacks into it: each then prints "Event loop is closed" with a traceback. Those
    are echoes of the one failure, so they are dropped; every other error still prints.
    """
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    drop = _DropOrbaxErrors()

    def excepthook(kind, error, tb):
        if not _closed_loop(error):
            hooks[0](kind, error, tb)

    def unraisablehook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            hooks[1](unraisable)

    def thread_excepthook(args):
        if not _closed_loop(args.exc_value):
            hooks[2](args)

    sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, thread_excepthook
    logging.getLogger("absl").addFilter(drop)
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
        logging.getLogger("absl").removeFilter(drop)


def abstract_like(abstract_state, shardings):
    """ShapeDtypeStructs carrying the shardings the restored arrays must land in."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


@contextlib.contextmanager
def _quiet_loggers(*names):
    """A damaged checkpoint makes Orbax's async readers log one traceback per array: keep one line."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move unreadable checkpoints to out_dir/unreadable_checkpoints/ so their step can be saved again."""
    if not steps or jax.process_index() != 0:
        return
    root = os.path.join(os.path.dirname(str(mngr.directory)), "unreadable_checkpoints")
    os.makedirs(root, exist_ok=True)
    for s in steps:
        target = os.path.join(root, f"{s}-{int(time.time())}")
        shutil.move(os.path.join(str(mngr.directory), str(s)), target)
        print(f"warning: moved unreadable checkpoint step {s} to {target}", file=sys.stderr)
    mngr.reload()


def _shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_layout(mngr: ocp.CheckpointManager, step: int, target) -> None:
    """A UserError when the checkpoint's params differ in names or shapes from the model's (another model).

    Read from the checkpoint's metadata, before any array: a difference here is a mismatch of models,
    while a failure reading the arrays afterwards is a damaged checkpoint (the caller falls back).
    """
    saved = _shapes(mngr.item_metadata(step)["state"].tree["params"])
    wanted = _shapes(target["params"])
    if saved != wanted:
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise UserError(f"checkpoint step {step} in {mngr.directory} holds other params than this model "
                        f"({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}): it was written by another "
                        f"model or code version; use a matching checkout, or out_dir= for a new run")


def restore_latest(mngr: ocp.CheckpointManager, target, check_meta=None, step: int | None = None,
                   set_aside: bool = True, newest: int | None = None):
    """(step, state, meta) of the newest readable checkpoint (or of `step`; none above `newest`); None if none.

    check_meta(meta) runs before the state is read and may raise UserError (e.g. another model).
    A checkpoint that fails to read is reported with a warning and the previous one is tried (the
    unreadable ones are then moved aside if `set_aside`, so training can save those steps again);
    if checkpoints exist but none reads, that is an error, never a silent fresh start.
    """
    steps = sorted((s for s in mngr.all_steps() if newest is None or s <= newest), reverse=True)
    if step is not None:
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in {mngr.directory}; available: {sorted(steps)}")
        steps = [step]
    if not steps:
        return None
    unreadable = []
    with _orphaned_reads_dropped(unreadable):
        found = _restore_first(mngr, target, check_meta, steps, unreadable)
    if found is None:
        raise UserError(f"no readable checkpoint in {mngr.directory} (tried steps {steps}); "
                        f"pass resume=false to start this run afresh, or out_dir= for a new one")
    if set_aside:
        _set_aside(mngr, unreadable)
    return found


def _restore_first(mngr, target, check_meta, steps: list, unreadable: list):
    """(step, state, meta) of the first of `steps` that reads, each that does not appended to `unreadable`."""
    for s in steps:
        try:
            meta = read_meta(mngr, s)
            if check_meta is not None:
                check_meta(meta)
            _check_layout(mngr, s, target)
            with _quiet_loggers("absl", "asyncio"):
                state = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint surfaces as many error types
            first = first_line(e, 160)
            print(f"warning: checkpoint step {s} in {mngr.directory} is unreadable ({type(e).__name__}: "
                  f"{first.split(' See full TensorStore')[0]}); falling back to an earlier one", file=sys.stderr)
            unreadable.append(s)
            continue
        return s, state, meta
    return None


@contextlib.contextmanager
def _orphaned_reads_dropped(unreadable: list):
    """A damaged checkpoint leaves Orbax's per-array read coroutines behind, each printing "Exception
    ignored in: <coroutine ...>" and its traceback when collected: echoes of the one warning above."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if getattr(unraisable.object, "__name__", None) != "_read_array_index_and_device_put":
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if unreadable:  # a restore that failed: collect them now, while the hook drops them
            gc.collect()
        sys.unraisablehook = previous
